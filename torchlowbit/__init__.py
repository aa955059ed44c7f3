"""torchlowbit: low-bit quantization for PyTorch with the bitsandbytes API (``import torchlowbit as bnb``)."""

from . import (  # noqa: F401
    functional,
    nn,
    ops,  # noqa: F401  (registers torch.ops.lowbit.*)
    optim,
)

__version__ = "0.1.0"
