"""``Optimizer8bit``: the base of the optimizers with 32-bit or 8-bit blockwise states.

Each step calls one ``lowbit`` update op per parameter (``optimizer_update_32bit`` or
``optimizer_update_8bit_blockwise``). Parameters with fewer than ``min_8bit_size`` elements (counted
globally for a sharded DTensor) keep 32-bit states. ``lr`` and the step count reach the ops as 0-d
tensors, so a ``torch.compile``d step does not recompile when they change (give ``lr`` as a tensor,
as with ``torch.optim``, for schedulers under compile). State keys are the original library's:
``step``, ``state1``, ``state2``, ``qmap1``, ``qmap2``, ``absmax1``, ``absmax2``.
"""

from typing import Any

import torch

from ..codebooks import create_dynamic_map
from ..ops.optimizer_update import BLOCKSIZE, OPTIMIZERS
from .global_optim_manager import GlobalOptimManager

_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # how bitsandbytes >= 0.49 nests the quantization state
_QUANT_STATE_NAMES = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
# Built once at import: a compiled first step then copies them instead of tracing their construction.
_SIGNED_MAP, _UNSIGNED_MAP = create_dynamic_map(signed=True), create_dynamic_map(signed=False)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (the ops update shards in place), else the tensor itself."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def _check_range(name: str, value: float, low: float, high: float, closed_high: bool = False) -> None:
    if not (low <= value < high or (closed_high and value == high)):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


class Optimizer8bit(torch.optim.Optimizer):
    """Shared step and state handling; ``optimizer_name`` selects the update rule of the ops."""

    def __init__(self, optimizer_name: str, params, defaults: dict[str, Any], optim_bits: int = 32,
                 is_paged: bool = False) -> None:  # fmt: skip
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"optimizer_name must be one of {sorted(OPTIMIZERS)}, got {optimizer_name!r}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if not isinstance(defaults["lr"], torch.Tensor) and defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        _check_range("eps", defaults["eps"], 0.0, float("inf"))
        _check_range("weight_decay", defaults["weight_decay"], 0.0, float("inf"))
        for index, beta in enumerate(defaults["betas"]):
            _check_range(f"betas[{index}]", beta, 0.0, 1.0)
        super().__init__(params, defaults)
        self.optimizer_name = optimizer_name
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()

    def _config(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The group's hyperparameters with this optimizer's bits and any GlobalOptimManager override."""
        config = {k: v for k, v in group.items() if k != "params"}
        config["optim_bits"] = self.optim_bits
        for module, name, override in self.mng.module_weight_config_triple:
            if getattr(module, name, None) is p:
                config.update(override)
        config.update(self.mng.pid2config.get(id(p), {}))
        return config

    def _init_state(self, p: torch.Tensor, config: dict[str, Any]) -> None:
        state = self.state[p]
        rule = OPTIMIZERS[self.optimizer_name]
        shape1 = (rule.state1_rows, *p.shape) if rule.state1_rows > 1 else p.shape
        eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        dtype = torch.uint8 if eight_bit else torch.float32
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["state1"] = torch.zeros(shape1, dtype=dtype, device=p.device)
        if rule.has_state2:
            state["state2"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if eight_bit:
            local = _local(p)
            blocks = -(-local.numel() // BLOCKSIZE)
            shape = (rule.state1_rows, blocks) if rule.state1_rows > 1 else (blocks,)
            state["qmap1"] = _SIGNED_MAP.to(local.device, copy=True)
            state["absmax1"] = torch.zeros(shape, dtype=torch.float32, device=local.device)
            if rule.has_state2:
                state["qmap2"] = _UNSIGNED_MAP.to(local.device, copy=True)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                config = self._config(group, p)
                if not self.state[p]:
                    self._init_state(p, config)
                self._update(p, config)
        return loss

    def _update(self, p: torch.Tensor, config: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] += 1
        lr = config["lr"]
        lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float32)
        beta1, beta2, beta3 = (*config["betas"], 0.0, 0.0)[:3]
        scalars = (
            lr, state["step"], beta1, beta2, beta3, config.get("alpha", 0.0), config["eps"], config["weight_decay"],
            1.0, config.get("max_unorm", 0.0), config.get("skip_zeros", False),
        )  # fmt: skip
        tensors = (_local(p), _local(p.grad), _local(state["state1"]), _local(state.get("state2")))
        if "absmax1" in state:
            torch.ops.lowbit.optimizer_update_8bit_blockwise(
                self.optimizer_name, *tensors, state["absmax1"], state.get("absmax2"), state["qmap1"],
                state.get("qmap2"), *scalars,
            )  # fmt: skip
        else:
            torch.ops.lowbit.optimizer_update_32bit(self.optimizer_name, *tensors, *scalars)

    def state_dict(self) -> dict[str, Any]:
        """The torch.optim state dict with ``step`` as a plain int, as the original library stores it."""
        state_dict = super().state_dict()
        # torch.optim hands out the live per-parameter dicts: build new ones rather than edit those
        state_dict["state"] = {
            index: {**state, "step": int(state["step"])} if "step" in state else state
            for index, state in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this library or of bitsandbytes (flat or nested quantization state)."""
        states = {k: _flat_state(v) for k, v in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": states})
        # torch.optim casts float states to the parameter's dtype; the states keep their own dtypes here.
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                saved, state = states.get(saved_id, {}), self.state[p]
                for name in _QUANT_STATE_NAMES:
                    if name in saved:
                        state[name] = saved[name].to(p.device, copy=True)
                if "step" in state:
                    state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).clone()


def _flat_state(state: dict[str, Any]) -> dict[str, Any]:
    nested = state.get(_QUANT_STATE_KEY)
    if nested is None:
        return state
    return {**{k: v for k, v in state.items() if k != _QUANT_STATE_KEY}, **nested}
