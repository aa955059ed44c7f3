"""Paged memory for optimizer states: ``paged_empty`` and ``prefetch_``.

On CUDA (csrc/paged_memory.cpp) ``paged_empty`` allocates CUDA managed memory, which the driver migrates
to the host when the device runs short, and ``prefetch_`` migrates a managed tensor back ahead of its use.
The reference kernels (CPU, or CUDA without the extension) use ordinary memory and prefetch nothing.
"""

import torch

from .registry import register_fake, register_reference


def _check_size(size: list[int]) -> None:
    if any(n < 0 for n in size):
        raise ValueError(f"size must have no negative entries, got {list(size)}")


@register_fake("paged_empty")
def _(like: torch.Tensor, size: list[int], dtype: torch.dtype) -> torch.Tensor:
    _check_size(size)
    return like.new_empty(size, dtype=dtype)


@register_reference("paged_empty")
def _(like: torch.Tensor, size: list[int], dtype: torch.dtype) -> torch.Tensor:
    _check_size(size)
    return torch.empty(size, dtype=dtype, device=like.device)


@register_fake("prefetch_")
def _(t: torch.Tensor, to_device: bool = True) -> None:
    return None


@register_reference("prefetch_")
def _(t: torch.Tensor, to_device: bool = True) -> None:
    return None
