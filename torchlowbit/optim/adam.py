"""Adam and AdamW (decoupled weight decay), with 8-bit, 32-bit and paged variants."""

from .optimizer import Optimizer8bit, _check_only
from .variants import variant


class Adam(Optimizer8bit):
    """Adam; ``weight_decay`` is decoupled (applied to the weights, as AdamW), as in the original library."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False) -> None:  # fmt: skip
        _check_only(amsgrad=(amsgrad, False), percentile_clipping=(percentile_clipping, 100),
                    block_wise=(block_wise, True))  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__("adam", params, defaults, optim_bits, is_paged)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged)  # fmt: skip


Adam8bit = variant(Adam, "Adam8bit", optim_bits=8)
Adam32bit = variant(Adam, "Adam32bit", optim_bits=32)
PagedAdam = variant(Adam, "PagedAdam", is_paged=True)
PagedAdam8bit = variant(Adam, "PagedAdam8bit", optim_bits=8, is_paged=True)
PagedAdam32bit = variant(Adam, "PagedAdam32bit", optim_bits=32, is_paged=True)
AdamW8bit = variant(AdamW, "AdamW8bit", optim_bits=8)
AdamW32bit = variant(AdamW, "AdamW32bit", optim_bits=32)
PagedAdamW = variant(AdamW, "PagedAdamW", is_paged=True)
PagedAdamW8bit = variant(AdamW, "PagedAdamW8bit", optim_bits=8, is_paged=True)
PagedAdamW32bit = variant(AdamW, "PagedAdamW32bit", optim_bits=32, is_paged=True)
