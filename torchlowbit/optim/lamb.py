"""LAMB: Adam whose update norm is capped at ``max_unorm`` times the parameter norm (the trust ratio)."""

from .optimizer import Optimizer8bit
from .variants import variant


class LAMB(Optimizer8bit):
    """LAMB with decoupled weight decay (``bias_correction`` and ``adam_w_mode`` are always on)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adam_w_mode=True, optim_bits=32, args=None, min_8bit_size=4096,
                 percentile_clipping=100, block_wise=False, max_unorm=1.0) -> None:  # fmt: skip
        if amsgrad:
            raise ValueError("amsgrad=True is not supported")
        if not bias_correction or not adam_w_mode:
            raise ValueError("bias_correction and adam_w_mode must be True (the only supported modes)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size,
                        max_unorm=max_unorm)  # fmt: skip
        super().__init__("lamb", params, defaults, optim_bits)


LAMB8bit = variant(LAMB, "LAMB8bit", optim_bits=8)
LAMB32bit = variant(LAMB, "LAMB32bit", optim_bits=32)
