"""Registration of fake and reference kernels for the ``lowbit::`` schemas.

The reference kernels are vectorized PyTorch: the CPU implementation, and the CUDA implementation of
any op that ``csrc/`` does not (yet) provide.
"""

from collections.abc import Callable

import torch

from . import schemas

_IMPL = torch.library.Library("lowbit", "IMPL")
REFERENCE_KERNELS: dict[str, Callable] = {}


def register_fake(name: str) -> Callable[[Callable], Callable]:
    """Register the shape-and-dtype (fake/meta) implementation of ``lowbit::name``."""
    if name not in schemas.SCHEMAS:
        raise KeyError(f"no schema lowbit::{name}")
    return torch.library.register_fake(f"lowbit::{name}")


def register_reference(name: str) -> Callable[[Callable], Callable]:
    """Register the PyTorch reference kernel of ``lowbit::name`` for CPU."""

    def register(fn: Callable) -> Callable:
        _IMPL.impl(name, fn, "CPU")
        REFERENCE_KERNELS[name] = fn
        return fn

    return register


def has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit::{name}", dispatch_key)


def fill_with_reference(dispatch_key: str) -> list[str]:
    """Register the reference kernel for ``dispatch_key`` wherever no native kernel exists; returns those ops."""
    filled = [name for name in REFERENCE_KERNELS if not has_kernel(name, dispatch_key)]
    for name in filled:
        _IMPL.impl(name, REFERENCE_KERNELS[name], dispatch_key)
    return filled
