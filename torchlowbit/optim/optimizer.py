"""``Optimizer8bit``: the base of the optimizers with 32-bit or 8-bit blockwise states.

Each step calls one grouped ``lowbit`` update op (``optimizer_update_32bit_grouped`` or
``optimizer_update_8bit_blockwise_grouped``) per unit: the parameters of a param group that share the kind of
state, dtype, device, DTensor-ness, maps and config overrides. The units are cached while the parameters with
gradients, their state tensors and the GlobalOptimManager overrides stay the same. Parameters with fewer than
``min_8bit_size`` elements (counted globally for a sharded DTensor) keep 32-bit states. ``lr`` and the step counts
reach the ops as 0-d tensors, so a ``torch.compile``d step does not recompile when they change (give ``lr`` as a
tensor, as with ``torch.optim``, for schedulers under compile). State keys are the original library's: ``step``,
``state1``, ``state2``, ``qmap1``, ``qmap2``, ``absmax1``, ``absmax2``.
"""

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch

from .. import _dtensor
from ..codebooks import create_dynamic_map
from ..ops.checks import FLOAT_DTYPES
from ..ops.optimizer_update import BLOCKSIZE, OPTIMIZERS
from .global_optim_manager import GlobalOptimManager

_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # how bitsandbytes >= 0.49 nests the quantization state
_QUANT_STATE_NAMES = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
# Built once at import: a compiled first step then copies them instead of tracing their construction.
_SIGNED_MAP, _UNSIGNED_MAP = create_dynamic_map(signed=True), create_dynamic_map(signed=False)


def _zeros_like(p: torch.Tensor, dtype: torch.dtype, leading: tuple[int, ...] = (), paged: bool = False):
    """Zeros of shape ``(*leading, *p.shape)``; for a DTensor ``p``, a DTensor sharded as ``p`` (shard-sized).

    ``paged``: in CUDA managed memory (see ``_paged_empty``).
    """
    local = _dtensor.local(p)
    shape = (*leading, *local.shape)
    if paged:
        zeros = _paged_empty(local, shape, dtype).zero_()
    else:
        zeros = torch.zeros(shape, dtype=dtype, device=local.device)
    return zeros if local is p else _dtensor.sharded_like(zeros, p, (*leading, *p.shape), len(leading))


def _paged_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into paged memory (a DTensor keeps its placements)."""
    local = _dtensor.local(t)
    paged = _paged_empty(local, local.shape, local.dtype).copy_(local)
    return paged if local is t else _dtensor.sharded_like(paged, t, tuple(t.shape))


def _paged_empty(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``lowbit::paged_empty`` on ``like``'s device, never asking for more than a GPU has free."""
    nbytes = math.prod(shape) * dtype.itemsize
    if like.device.type == "cuda" and not torch.compiler.is_compiling():
        free = torch.cuda.mem_get_info(like.device)[0]
        if nbytes > free:
            raise torch.OutOfMemoryError(
                f"a paged optimizer state of {nbytes} bytes is more than the {free} bytes free on {like.device}; "
                "paged states are never allocated beyond the device's free memory"
            )
    return torch.ops.lowbit.paged_empty(like, list(shape), dtype)


def _absmax_like(p: torch.Tensor, leading: tuple[int, ...] = ()) -> torch.Tensor:
    """The float32 absmax of an 8-bit state of ``p``: one per block of ``BLOCKSIZE`` of the flattened state.

    For a DTensor ``p`` it is ``(*leading, groups, blocks per group)`` with each group covering whole rows of ``p``
    and whole blocks, sharded along the groups as ``p`` along its rows: every rank's blocks are then the
    global blocks, so a checkpoint reshards to another world size.
    """
    local = _dtensor.local(p)
    if local is p:
        return torch.zeros((*leading, -(-p.numel() // BLOCKSIZE)), dtype=torch.float32, device=p.device)
    rows, row_size = (p.shape[0], p[0].numel()) if p.dim() else (1, 1)
    rows_per_group = math.lcm(row_size, BLOCKSIZE) // row_size
    placements = tuple(p.placements)
    if any(pl.is_shard() and pl.dim != 0 for pl in placements):
        raise ValueError(f"8-bit states need parameters sharded along dim 0 (as FSDP2 does), got {placements}")
    shards = math.prod(p.device_mesh.size(dim) for dim, pl in enumerate(placements) if pl.is_shard())
    chunk = -(-rows // shards)
    if shards > 1 and chunk % rows_per_group:
        raise ValueError(
            f"8-bit states of a parameter of shape {list(p.shape)} sharded into pieces of {chunk} rows: each piece "
            f"must start on a block of {BLOCKSIZE} elements, i.e. hold a multiple of {rows_per_group} rows"
        )
    local_rows = local.shape[0] if local.dim() else 1
    groups = (-(-local_rows // rows_per_group), row_size * rows_per_group // BLOCKSIZE)
    zeros = torch.zeros((*leading, *groups), dtype=torch.float32, device=local.device)
    return _dtensor.sharded_like(zeros, p, (*leading, -(-rows // rows_per_group), groups[1]), len(leading))


def _blocks(absmax: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """The first ``blocks`` entries of each of the ``rows`` states in ``absmax`` (a last group may be partial)."""
    if absmax.shape == ((rows, blocks) if rows > 1 else (blocks,)):
        return absmax  # an unsharded parameter's absmax, as it is
    view = absmax.reshape(rows, -1)[:, :blocks]
    if not view.is_contiguous():
        raise ValueError("two first-moment states over a partial last block group are not supported")
    return view if rows > 1 else view.reshape(-1)


class _Unit(NamedTuple):
    """Parameters one grouped op updates, with their local states (lists empty where a state is absent)."""

    params: list[torch.Tensor]
    dtensor: bool  # the parameters are DTensors: the op takes their local shards
    steps: list[torch.Tensor]
    state1: list[torch.Tensor]
    state2: list[torch.Tensor]
    absmax1: list[torch.Tensor]
    absmax2: list[torch.Tensor]
    qmap1: torch.Tensor | None
    qmap2: torch.Tensor | None


class _Plan(NamedTuple):
    """A param group's units, valid while its parameters with gradients, their states (the same tensors under the
    same keys: a cleared or replaced state is initialized again) and the manager's overrides stay."""

    params: list[torch.Tensor]
    states: list[tuple[dict[str, Any], list]]  # each parameter's state dict and its _PLANNED_STATE entries
    overrides_version: int
    units: list[_Unit]


# the state entries a unit holds (updated in place); a replaced one (a cleared state, new maps) regroups
_PLANNED_STATE = ("step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def _same(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, None or a tuple of them (a value that compares by content)."""
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, tuple) and all(_plain(v) for v in value)
    )


def _override_key(override: dict[str, Any], p: torch.Tensor) -> Hashable:
    """A key equal for equal overrides of plain values; ``p``'s own key otherwise (it keeps its own unit). No
    ``hash()``: torch.compile cannot trace it on torch 2.11."""
    key = tuple(sorted(override.items()))
    return key if all(_plain(value) for _, value in key) else ("own", id(p))


def _check_only(**arguments: tuple[Any, Any]) -> None:
    """Each argument given as ``name=(value, supported)`` must have the only value the update kernels implement."""
    for name, (value, supported) in arguments.items():
        if value != supported:
            raise ValueError(f"{name} must be {supported!r} (the only supported value), got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, closed_high: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
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
        self.optimizer_name = optimizer_name  # before the groups are added: _check_group reads it
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self._plans: dict[int, _Plan] = {}  # by param group index
        # by parameter id: the (qmap1, qmap2) tensors of its state known to hold the dynamic maps (None, None for
        # 32-bit states); a parameter whose state has other map tensors gets a unit of its own, since a grouped
        # op takes one pair of maps for all its parameters
        self._dynamic_maps: dict[int, tuple] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (the constructor's groups come through it too), checked first."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]  # frozen ones (e.g. a quantized base weight) are never updated
        bad = [(i, p.dtype) for i, p in enumerate(params) if p.requires_grad and p.dtype not in FLOAT_DTYPES]
        if bad:
            self.param_groups.pop()
            index, dtype = bad[0]
            raise TypeError(
                f"parameter {index} of group {len(self.param_groups)} has dtype {dtype}; the update kernels take "
                f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
            )

    def _check_group(self, group: dict[str, Any]) -> None:
        """A group's hyperparameters (defaults merged in): a ValueError or TypeError naming the bad one."""
        if not isinstance(group["lr"], torch.Tensor):
            _check_range("lr", group["lr"], 0.0, float("inf"))
        _check_range("eps", group["eps"], 0.0, float("inf"))
        _check_range("weight_decay", group["weight_decay"], 0.0, float("inf"))
        for name in ("min_8bit_size", "max_unorm"):
            if name in group:
                _check_range(name, group[name], 0, float("inf"))
        betas, count = group["betas"], 3 if self.optimizer_name == "ademamix" else 2
        if not isinstance(betas, (tuple, list)) or len(betas) != count:
            raise ValueError(f"betas must be a tuple of {count} values, got {betas!r}")
        for index, beta in enumerate(betas):
            _check_range(f"betas[{index}]", beta, 0.0, 1.0)

    def _overrides(self, p: torch.Tensor) -> dict[str, Any]:
        """The GlobalOptimManager overrides of ``p``'s config."""
        override = {}
        for module, name, config in self.mng.module_weight_config_triple:
            if getattr(module, name, None) is p:
                override.update(config)
        override.update(self.mng.pid2config.get(id(p), {}))
        return override

    def _config(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The group's hyperparameters with this optimizer's bits and any GlobalOptimManager override."""
        config = {k: v for k, v in group.items() if k != "params"}
        config["optim_bits"] = self.optim_bits
        config.update(self._overrides(p))
        return config

    def _group_key(self, group: dict[str, Any], p: torch.Tensor) -> tuple:
        """What parameters updated by one grouped op (with one config, ``_config`` of the first) share."""
        local = _dtensor.local(p)
        maps, known = _maps(self.state[p]), self._dynamic_maps.get(id(p))
        custom = None if known is not None and _same(known, maps) else id(p)
        return (
            local.dtype,
            local.device,
            local is not p,
            "absmax1" in self.state[p],
            custom,
            _override_key(self._overrides(p), p),
        )

    def _init_state(self, p: torch.Tensor, config: dict[str, Any]) -> None:
        state = self.state[p]
        rule = OPTIMIZERS[self.optimizer_name]
        leading = (rule.state1_rows,) if rule.state1_rows > 1 else ()
        eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]  # global size, not a shard's
        dtype = torch.uint8 if eight_bit else torch.float32
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["state1"] = _zeros_like(p, dtype, leading, self.is_paged)
        if rule.has_state2:
            state["state2"] = _zeros_like(p, dtype, paged=self.is_paged)
        if eight_bit:
            device = _dtensor.local(p).device
            state["qmap1"] = _SIGNED_MAP.to(device, copy=True)
            state["absmax1"] = _absmax_like(p, leading)
            if rule.has_state2:
                state["qmap2"] = _UNSIGNED_MAP.to(device, copy=True)
                state["absmax2"] = _absmax_like(p)
        self._dynamic_maps[id(p)] = _maps(state)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            for unit in self._units(index, group):
                self._update(unit, group)
        return loss

    def _units(self, index: int, group: dict[str, Any]) -> list[_Unit]:
        """The units of param group ``index`` this step: the cached plan's while it holds."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        plan = self._plans.get(index)
        if plan is None or plan.overrides_version != self.mng.version or not self._holds(plan, params):
            units = self._plan(group, params)
            states = [(self.state[p], [self.state[p].get(name) for name in _PLANNED_STATE]) for p in params]
            plan = _Plan(params, states, self.mng.version, units)
            self._plans[index] = plan
        return plan.units

    def _holds(self, plan: _Plan, params: list[torch.Tensor]) -> bool:
        """Whether ``plan`` still covers ``params`` with the states it was made with."""
        if not _same(plan.params, params):
            return False
        for p, (state, tensors) in zip(params, plan.states, strict=True):
            if self.state.get(p) is not state:
                return False
            for name, tensor in zip(_PLANNED_STATE, tensors, strict=True):
                if state.get(name) is not tensor:
                    return False
        return True

    def _plan(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[_Unit]:
        """Initializes the states ``params`` lack and sorts ``params`` into units."""
        members: dict[Hashable, list[torch.Tensor]] = {}
        for p in params:
            if not self.state[p]:
                self._init_state(p, self._config(group, p))
            members.setdefault(self._group_key(group, p), []).append(p)
        return [self._unit(unit_params) for unit_params in members.values()]

    def _unit(self, params: list[torch.Tensor]) -> _Unit:
        states = [self.state[p] for p in params]
        blocks = [-(-_dtensor.local(p).numel() // BLOCKSIZE) for p in params]

        def local(name: str, rows: int = 0) -> list[torch.Tensor]:
            """Each state's ``name`` (none where absent); with ``rows``, an absmax's blocks (see ``_blocks``)."""
            if name not in states[0]:
                return []
            tensors = [_dtensor.local(state[name]) for state in states]
            return [_blocks(t, rows, n) for t, n in zip(tensors, blocks, strict=True)] if rows else tensors

        first = states[0]
        return _Unit(
            params, _dtensor.local(params[0]) is not params[0], [state["step"] for state in states],
            local("state1"), local("state2"), local("absmax1", OPTIMIZERS[self.optimizer_name].state1_rows),
            local("absmax2", 1), first.get("qmap1"), first.get("qmap2"),
        )  # fmt: skip

    def _update(self, unit: _Unit, group: dict[str, Any]) -> None:
        config = self._config(group, unit.params[0])
        torch._foreach_add_(unit.steps, 1)
        lr = config["lr"]
        lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float32)
        beta1, beta2, beta3 = (*config["betas"], 0.0, 0.0)[:3]
        scalars = (
            lr, unit.steps, beta1, beta2, beta3, config.get("alpha", 0.0), config["eps"], config["weight_decay"],
            1.0, config.get("max_unorm", 0.0), config.get("skip_zeros", False),
        )  # fmt: skip
        params = [p.to_local() for p in unit.params] if unit.dtensor else unit.params
        grads = [_dtensor.local(p.grad) for p in unit.params] if unit.dtensor else [p.grad for p in unit.params]
        if self.is_paged:  # managed memory the driver may have paged out: bring it back ahead of the update
            for t in (*unit.state1, *unit.state2):
                torch.ops.lowbit.prefetch_(t)
        name = self.optimizer_name
        if unit.absmax1:
            torch.ops.lowbit.optimizer_update_8bit_blockwise_grouped(
                name, params, grads, unit.state1, unit.state2, unit.absmax1, unit.absmax2, unit.qmap1, unit.qmap2,
                *scalars,
            )  # fmt: skip
        else:
            torch.ops.lowbit.optimizer_update_32bit_grouped(name, params, grads, unit.state1, unit.state2, *scalars)

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
        rule = OPTIMIZERS[self.optimizer_name]
        # before anything loads; torch checks the group sizes, so pairs of unequal lists end at the shorter
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=False):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=False):
                if states.get(saved_id):
                    _check_saved_state(states[saved_id], p, rule, saved_id)
        super().load_state_dict({**state_dict, "state": states})
        self._plans.clear()
        # torch.optim casts float states to the parameter's dtype; the states keep their own dtypes here.
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                saved, state = states.get(saved_id, {}), self.state[p]
                for name in _QUANT_STATE_NAMES:
                    if name in saved:
                        paged = self.is_paged and name in ("state1", "state2")  # copied once, into managed memory
                        value = saved[name].to(p.device, copy=not paged)
                        state[name] = _paged_copy(value) if paged else value
                self._dynamic_maps.pop(id(p), None)
                if _has_dynamic_maps(state):
                    self._dynamic_maps[id(p)] = _maps(state)
                if "step" in state:
                    state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).clone()


def _check_saved_state(saved: dict[str, Any], p: torch.Tensor, rule, index: int) -> None:
    """A saved parameter state must have the entries and shape a step needs (checked before anything loads)."""
    eight_bit = isinstance(saved.get("state1"), torch.Tensor) and saved["state1"].dtype == torch.uint8
    needed = ["step", "state1"] + (["state2"] if rule.has_state2 else [])
    if eight_bit:
        needed += ["qmap1", "absmax1"] + (["qmap2", "absmax2"] if rule.has_state2 else [])
    missing = [name for name in needed if name not in saved]
    if missing:
        raise ValueError(f"the saved state of parameter {index} is missing {missing}")
    expected = ((rule.state1_rows,) if rule.state1_rows > 1 else ()) + tuple(p.shape)
    if tuple(saved["state1"].shape) != expected:
        raise ValueError(
            f"the saved state1 of parameter {index} has shape {list(saved['state1'].shape)}, the parameter needs "
            f"{list(expected)}"
        )


def _maps(state: dict[str, Any]) -> tuple:
    return state.get("qmap1"), state.get("qmap2")


def _has_dynamic_maps(state: dict[str, Any]) -> bool:
    """Whether the state's maps, if it has any, are the ones every new 8-bit state gets."""
    maps = (("qmap1", _SIGNED_MAP), ("qmap2", _UNSIGNED_MAP))
    return all(torch.equal(_dtensor.local(state[name]).cpu(), value) for name, value in maps if name in state)


def _flat_state(state: dict[str, Any]) -> dict[str, Any]:
    nested = state.get(_QUANT_STATE_KEY)
    if nested is None:
        return state
    return {**{k: v for k, v in state.items() if k != _QUANT_STATE_KEY}, **nested}
