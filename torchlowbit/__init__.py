"""torchlowbit: low-bit quantization for PyTorch with the bitsandbytes API (``import torchlowbit as bnb``)."""

from . import ops  # noqa: F401  (registers torch.ops.lowbit.*)
from . import functional, nn, optim  # noqa: F401

__version__ = "0.1.0"
