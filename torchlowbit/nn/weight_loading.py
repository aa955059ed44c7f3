"""``LoadsQuantizedWeight``: state-dict loading of a quantized ``weight`` and its companion entries.

The checkpoint's weight is decoded and validated before anything in the module changes, so a rejected
checkpoint leaves the module as it was. A weight on the meta device, or ``load_state_dict(assign=True)``,
takes the checkpoint's tensors; otherwise they are copied into the existing weight in place.
"""

import torch
from torch import nn

from .quantized_parameter import QuantizedParameter


class LoadsQuantizedWeight(nn.Module):
    """Mixin for modules whose ``weight`` is a ``QuantizedParameter`` stored as several state-dict entries."""

    def _weight_entries(self, state_dict: dict, prefix: str) -> set[str]:
        """The state-dict keys that together make up the weight."""
        raise NotImplementedError

    def _decode_weight(self, state_dict: dict, prefix: str, device: torch.device) -> torch.Tensor:
        """The checkpoint's weight on ``device``, checked against this module; raises on a mismatch."""
        raise NotImplementedError

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        loaded = None
        if key not in state_dict and strict:
            missing_keys.append(key)  # and load nothing else: a rejected checkpoint changes nothing
            return
        if key in state_dict:
            current = self.weight
            assign = local_metadata.get("assign_to_params_buffers", False) or current.is_meta
            try:
                loaded = self._decode_weight(state_dict, prefix, state_dict[key].device if assign else current.device)
            except (ValueError, TypeError, KeyError) as error:
                error_msgs.append(f"While loading {key} into {type(self).__name__}: {error}")
                return
        ours = self._weight_entries(state_dict, prefix)
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


def _copyable(current: torch.Tensor, loaded: torch.Tensor) -> bool:
    if isinstance(current, QuantizedParameter):
        return type(current) is type(loaded) and current._layout() == loaded._layout()
    return not isinstance(loaded, QuantizedParameter) and current.shape == loaded.shape
