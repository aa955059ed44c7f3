"""SGD with momentum and LARS (momentum with a layer-wise trust ratio), 8-bit and 32-bit."""

from .optimizer import Optimizer8bit, _check_only
from .variants import variant


def _check_momentum(momentum: float, dampening: float, nesterov: bool, percentile_clipping: int) -> None:
    if not 0 < momentum < 1:
        hint = ": use torch.optim.SGD (there are no states to save)" if momentum == 0 else ""
        raise ValueError(f"momentum must be in (0, 1), got {momentum}{hint}")
    _check_only(dampening=(dampening, 0), nesterov=(nesterov, False), percentile_clipping=(percentile_clipping, 100))


class SGD(Optimizer8bit):
    """SGD with heavy-ball momentum (no dampening); ``weight_decay`` is added to the gradient."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True) -> None:  # fmt: skip
        _check_momentum(momentum, dampening, nesterov, percentile_clipping)
        _check_only(block_wise=(block_wise, True))
        defaults = dict(lr=lr, betas=(momentum, dampening), eps=0.0, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size)  # fmt: skip
        super().__init__("momentum", params, defaults, optim_bits)


class LARS(Optimizer8bit):
    """Momentum SGD whose update norm is capped at ``max_unorm`` times the parameter norm."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, max_unorm=0.02) -> None:  # fmt: skip
        _check_momentum(momentum, dampening, nesterov, percentile_clipping)
        defaults = dict(lr=lr, betas=(momentum, dampening), eps=0.0, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size, max_unorm=max_unorm)  # fmt: skip
        super().__init__("lars", params, defaults, optim_bits)


SGD8bit = variant(SGD, "SGD8bit", optim_bits=8)
SGD32bit = variant(SGD, "SGD32bit", optim_bits=32)
LARS8bit = variant(LARS, "LARS8bit", optim_bits=8)
LARS32bit = variant(LARS, "LARS32bit", optim_bits=32)
