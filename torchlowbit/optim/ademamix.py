"""AdEMAMix: a fast and a slow (``beta3``, weight ``alpha``) momentum over Adam's denominator."""

import math

from .optimizer import Optimizer8bit
from .variants import variant


class AdEMAMix(Optimizer8bit):
    """AdEMAMix with optional warm-up schedules of ``alpha`` (``t_alpha`` steps) and ``beta3`` (``t_beta3``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None,
                 eps=1e-8, weight_decay=1e-2, optim_bits=32, min_8bit_size=4096, is_paged=False) -> None:  # fmt: skip
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay, min_8bit_size=min_8bit_size)  # fmt: skip
        super().__init__("ademamix", params, defaults, optim_bits, is_paged)

    def _check_group(self, group):
        super()._check_group(group)
        beta1, _, beta3 = group["betas"]
        if group["t_beta3"] and not (beta1 > 0 and beta3 > 0):
            raise ValueError(
                f"t_beta3 interpolates log(betas[0]) and log(betas[2]): both must be > 0, got {beta1} and {beta3}"
            )

    def _config(self, group, p):
        """The scheduled ``alpha`` and ``beta3`` of the coming step (as in the AdEMAMix paper)."""
        config = super()._config(group, p)
        if not (config["t_alpha"] or config["t_beta3"]):
            return config
        step = int(self.state[p]["step"]) + 1 if self.state[p] else 1
        beta1, beta2, beta3 = config["betas"]
        if config["t_alpha"]:
            config["alpha"] = min(step * config["alpha"] / config["t_alpha"], config["alpha"])
        if config["t_beta3"]:
            s = step / config["t_beta3"]
            log1, log3 = math.log(beta1), math.log(beta3)
            config["betas"] = (beta1, beta2, min(math.exp(log1 * log3 / ((1 - s) * log3 + s * log1)), beta3))
        return config

    def _group_key(self, group, p):
        """With a schedule the config depends on the step count: a unit takes parameters at one step only."""
        key, config = super()._group_key(group, p), super()._config(group, p)
        return (*key, int(self.state[p]["step"])) if config["t_alpha"] or config["t_beta3"] else key


AdEMAMix8bit = variant(AdEMAMix, "AdEMAMix8bit", optim_bits=8)
AdEMAMix32bit = variant(AdEMAMix, "AdEMAMix32bit", optim_bits=32)
PagedAdEMAMix = variant(AdEMAMix, "PagedAdEMAMix", is_paged=True)
PagedAdEMAMix8bit = variant(AdEMAMix, "PagedAdEMAMix8bit", optim_bits=8, is_paged=True)
PagedAdEMAMix32bit = variant(AdEMAMix, "PagedAdEMAMix32bit", optim_bits=32, is_paged=True)
