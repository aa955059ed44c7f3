"""RMSprop and Adagrad, 8-bit and 32-bit."""

from .optimizer import Optimizer8bit, _check_only
from .variants import variant


class RMSprop(Optimizer8bit):
    """RMSprop (``alpha`` smooths the squared gradients; eps outside the square root)."""

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        _check_only(centered=(centered, False), momentum=(momentum, 0), percentile_clipping=(percentile_clipping, 100),
                   block_wise=(block_wise, True))  # fmt: skip
        defaults = dict(lr=lr, betas=(alpha, momentum), eps=eps, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size)  # fmt: skip
        super().__init__("rmsprop", params, defaults, optim_bits)


class Adagrad(Optimizer8bit):
    """Adagrad (sum of squared gradients; eps outside the square root)."""

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
    ) -> None:
        _check_only(initial_accumulator_value=(initial_accumulator_value, 0), lr_decay=(lr_decay, 0),
                   percentile_clipping=(percentile_clipping, 100), block_wise=(block_wise, True))  # fmt: skip
        defaults = dict(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__("adagrad", params, defaults, optim_bits)


RMSprop8bit = variant(RMSprop, "RMSprop8bit", optim_bits=8)
RMSprop32bit = variant(RMSprop, "RMSprop32bit", optim_bits=32)
Adagrad8bit = variant(Adagrad, "Adagrad8bit", optim_bits=8)
Adagrad32bit = variant(Adagrad, "Adagrad32bit", optim_bits=32)
