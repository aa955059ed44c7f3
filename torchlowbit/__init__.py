"""torchlowbit: low-bit quantization for PyTorch with the bitsandbytes API (``import torchlowbit as bnb``)."""

from . import functional, nn, ops, optim  # noqa: F401  (ops registers torch.ops.lowbit.*)
from .quantize import quantize_

__all__ = ["functional", "nn", "ops", "optim", "quantize_"]

__version__ = "0.1.0"
