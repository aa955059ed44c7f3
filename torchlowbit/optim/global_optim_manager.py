"""``GlobalOptimManager``: per-parameter optimizer overrides (e.g. 32-bit state for embeddings)."""

import weakref
from typing import Any

import torch
from torch import nn


class GlobalOptimManager:
    """The process-wide registry of optimizer config overrides; get it with ``get_instance()``."""

    _instance: "GlobalOptimManager | None" = None

    def __init__(self) -> None:
        raise RuntimeError("GlobalOptimManager is a singleton: call GlobalOptimManager.get_instance()")

    def initialize(self) -> None:
        """Forget every override."""
        for finalizer in getattr(self, "_finalizers", {}).values():
            finalizer.detach()
        self._finalizers: dict[int, weakref.finalize] = {}  # by parameter id: drops its overrides when it dies
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple: list[tuple[nn.Module, str, dict[str, Any]]] = []
        self._changed()

    def _changed(self) -> None:
        """Counts a change of the overrides: optimizers regroup their parameters at their next step."""
        self.version = getattr(self, "version", 0) + 1

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params) -> None:
        """Map overrides given by parameter identity to (group index, parameter index) positions."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group_index, group in enumerate(groups):
            for param_index, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(group_index, param_index)] = self.pid2config[id(p)]

    def override_config(
        self,
        parameters: torch.Tensor | list[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override optimizer hyperparameters (e.g. ``optim_bits=32``) for ``parameters``."""
        if key is not None and key_value_dict is not None:
            raise ValueError("give either key and value, or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if key_value_dict is None:
            raise ValueError("override_config needs key and value, or key_value_dict")
        _check_override(key_value_dict)
        self.uses_config_override = True
        for p in [parameters] if isinstance(parameters, torch.Tensor) else parameters:
            if id(p) not in self._finalizers:  # forget it with the tensor: a later tensor may reuse its id
                self._finalizers[id(p)] = weakref.finalize(p, self._forget, id(p))
                self._finalizers[id(p)].atexit = False
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)
        self._changed()

    def _forget(self, pid: int) -> None:
        """Drops the overrides of a parameter that no longer exists."""
        del self._finalizers[pid]
        if self.pid2config.pop(pid, None) is not None:
            self._changed()

    def register_module_override(self, module: nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override the config of ``module.<param_name>`` whatever tensor it holds when the optimizer starts."""
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no parameter {param_name!r}")
        _check_override(config)
        self.module_weight_config_triple.append((module, param_name, config))
        self._changed()


def _check_override(config: dict[str, Any]) -> None:
    if "optim_bits" in config and config["optim_bits"] not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {config['optim_bits']!r}")
