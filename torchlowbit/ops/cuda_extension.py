"""Loading of the compiled CUDA kernels (``csrc/``, built as ``torchlowbit._C``) for the CUDA dispatch key.

The extension registers its kernels with ``TORCH_LIBRARY_IMPL(lowbit, CUDA, ...)`` when loaded. Set
``TORCHLOWBIT_JIT=1`` to compile ``csrc/`` with ninja at import time instead (development checkouts).
"""

import importlib.util
import os
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _jit_build() -> None:
    from torch.utils import cpp_extension

    from torchlowbit.ops.cuda_arch import sm90a_defines

    sources = sorted(str(p) for p in _CSRC.glob("*.c[up]*"))
    defines = sm90a_defines()
    cpp_extension.load(
        name="torchlowbit_C",
        sources=sources,
        extra_cflags=["-O3", *defines],
        extra_cuda_cflags=["-O3", "-lineinfo", *defines],
        is_python_module=False,
    )


def load() -> tuple[bool, str]:
    """Load the CUDA kernels; returns whether they are loaded and why not."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if os.environ.get("TORCHLOWBIT_JIT") == "1":
        try:
            _jit_build()
        except Exception as error:  # a failed JIT build leaves the reference kernels in place
            return False, f"JIT build of {_CSRC} failed: {error}"
        return True, f"JIT-built from {_CSRC}"
    spec = importlib.util.find_spec("torchlowbit._C")
    if spec is None or spec.origin is None:
        return False, "not built: reinstall with nvcc and a CUDA build of torch, or set TORCHLOWBIT_JIT=1"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:
        return False, f"{spec.origin} failed to load: {error}"
    return True, f"loaded {spec.origin}"
