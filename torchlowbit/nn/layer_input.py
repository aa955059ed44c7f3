"""The checks the quantized linear layers share: clear errors naming the layer, not an op's argument."""

import torch
from torch import nn

from ..ops.checks import FLOAT_DTYPES


def check_input(layer: nn.Linear, x: torch.Tensor) -> None:
    """``x`` must be a 16- or 32-bit float tensor of shape ``(..., layer.in_features)``."""
    name = type(layer).__name__
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} input must have a float dtype (float16, bfloat16, float32), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"{name} input must have shape (..., {layer.in_features}), got {list(x.shape)}")


def check_weight_shape(layer: nn.Linear, shape: tuple[int, ...]) -> None:
    """The (logical) ``shape`` of ``layer.weight`` must be ``(layer.out_features, layer.in_features)``."""
    expected = [layer.out_features, layer.in_features]
    if list(shape) != expected:
        raise ValueError(f"{type(layer).__name__}.weight must have shape {expected}, got {list(shape)}")
