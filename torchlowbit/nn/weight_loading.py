"""``LoadsQuantizedWeight``: the state-dict entries of a quantized ``weight`` (saving and loading).

The checkpoint's weight is decoded and validated before anything in the module changes, so a rejected
checkpoint leaves the module as it was. A weight on the meta device, or ``load_state_dict(assign=True)``,
takes the checkpoint's tensors; otherwise they are copied into the existing weight in place.

Under FSDP2 the weight is a DTensor over a row shard of the quantized weight: the entries cut with the rows
(codes, scales) are then DTensors sharded the same way and the rest are whole, so ``get_model_state_dict``
and ``torch.distributed.checkpoint`` see the same keys as an unsharded module and can reshard them.
"""

from typing import ClassVar

import torch
from torch import nn

from .. import _dtensor
from .quantized_parameter import QuantizedParameter


class _AnyAttribute:
    def __getattr__(self, name: str) -> "_AnyAttribute":
        if name.startswith("_"):  # the walk also probes hooks such as ``_fqn_modifiers``: there are none here
            raise AttributeError(name)
        return self


class LoadsQuantizedWeight(nn.Module):
    """Mixin for modules whose ``weight`` is a ``QuantizedParameter`` stored as several state-dict entries."""

    _state_roots: ClassVar[tuple[str, ...]]  # first parts of the weight's keys: ``weight`` (``weight.absmax``), ``SCB``

    def _weight_entries(self, state_dict: dict, prefix: str) -> set[str]:
        """The state-dict keys that together make up the weight (by default: the roots)."""
        return {prefix + root for root in self._state_roots}

    def _weight_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state-dict entries (without prefix) that a quantized weight adds to ``nn.Module``'s own."""
        raise NotImplementedError

    def _decode_weight(self, state_dict: dict, prefix: str, device: torch.device, current: torch.Tensor):
        """The checkpoint's weight on ``device``, checked against ``current``; raises on a mismatch."""
        raise NotImplementedError

    def _fqn_modifiers(self) -> dict[str, str]:
        """Lets ``torch.distributed.checkpoint.state_dict`` walk keys such as ``weight.absmax`` or ``SCB``.

        It resolves every key as a chain of attributes; the weight's keys are not attributes, so their roots
        lead to an object that has any attribute (the keys themselves come from ``state_dict()``).
        """
        return dict.fromkeys(self._state_roots, "_state_dict_keys")

    _state_dict_keys = _AnyAttribute()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        local = _dtensor.local(weight)
        for key, value in self._weight_state(local).items():
            value = value if local is weight else _sharded_entry(value, local, weight)
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        loaded = None
        if key not in state_dict and strict:
            missing_keys.append(key)  # and load nothing else: a rejected checkpoint changes nothing
            return
        ours = self._weight_entries(state_dict, prefix)
        if key in state_dict:
            current = _dtensor.local(self.weight)
            sharded = current is not self.weight
            assign = not sharded and (local_metadata.get("assign_to_params_buffers", False) or current.is_meta)
            entries = {k: _dtensor.local(v) for k, v in state_dict.items() if k in ours}
            try:
                loaded = self._decode_weight(
                    entries, prefix, entries[key].device if assign else current.device, current
                )
                if sharded and not _copyable(current, loaded):
                    raise ValueError(f"a sharded {type(current).__name__} loads only a checkpoint of its own layout")
            except (ValueError, TypeError, KeyError) as error:
                error_msgs.append(f"While loading {key} into {type(self).__name__}: {error}")
                return
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if loaded is None:
            return  # not strict: the weight stays as it is
        missing_keys.remove(key)
        if assign or not _copyable(current, loaded):
            self.weight = loaded if isinstance(loaded, QuantizedParameter) else nn.Parameter(loaded)
        else:
            with torch.no_grad():
                current.copy_(loaded)
            if isinstance(current, QuantizedParameter):
                current.meta = loaded.meta  # the checkpoint's metadata (e.g. dtype) comes with it


def _sharded_entry(value: torch.Tensor, local: QuantizedParameter, weight: torch.Tensor) -> torch.Tensor:
    """``value``, one of ``local``'s row-cut inner tensors, as a DTensor sharded like ``weight``; else as it is."""
    for name, rows_per_entry in local._rows_per_entry().items():
        if value is getattr(local, name):
            return _dtensor.sharded_like(value, weight, (-(-weight.shape[0] // rows_per_entry), *value.shape[1:]))
    return value


def _copyable(current: torch.Tensor, loaded: torch.Tensor) -> bool:
    if isinstance(current, QuantizedParameter):
        return type(current) is type(loaded) and current._layout() == loaded._layout()
    return not isinstance(loaded, QuantizedParameter) and current.shape == loaded.shape
