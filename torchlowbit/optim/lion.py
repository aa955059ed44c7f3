"""Lion (sign of an interpolated momentum), with 8-bit, 32-bit and paged variants."""

from .optimizer import Optimizer8bit, _check_only
from .variants import variant


class Lion(Optimizer8bit):
    """Lion with decoupled weight decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False) -> None:  # fmt: skip
        _check_only(percentile_clipping=(percentile_clipping, 100), block_wise=(block_wise, True))
        defaults = dict(lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__("lion", params, defaults, optim_bits, is_paged)


Lion8bit = variant(Lion, "Lion8bit", optim_bits=8)
Lion32bit = variant(Lion, "Lion32bit", optim_bits=32)
PagedLion = variant(Lion, "PagedLion", is_paged=True)
PagedLion8bit = variant(Lion, "PagedLion8bit", optim_bits=8, is_paged=True)
PagedLion32bit = variant(Lion, "PagedLion32bit", optim_bits=32, is_paged=True)
