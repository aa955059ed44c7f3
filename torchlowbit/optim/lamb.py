"""LAMB: Adam whose update norm is capped at ``max_unorm`` times the parameter norm (the trust ratio)."""

from .optimizer import Optimizer8bit, _check_only
from .variants import variant


class LAMB(Optimizer8bit):
    """LAMB with decoupled weight decay (``bias_correction`` and ``adam_w_mode`` are always on)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adam_w_mode=True, optim_bits=32, args=None, min_8bit_size=4096,
                 percentile_clipping=100, block_wise=False, max_unorm=1.0) -> None:  # fmt: skip
        # block_wise: the original defaults to False (one absmax per tensor); the states here are always blockwise
        _check_only(amsgrad=(amsgrad, False), bias_correction=(bias_correction, True), adam_w_mode=(adam_w_mode, True),
                   percentile_clipping=(percentile_clipping, 100))  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size,
                        max_unorm=max_unorm)  # fmt: skip
        super().__init__("lamb", params, defaults, optim_bits)


LAMB8bit = variant(LAMB, "LAMB8bit", optim_bits=8)
LAMB32bit = variant(LAMB, "LAMB32bit", optim_bits=32)
