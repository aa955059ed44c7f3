"""``lowbit::quantize_blockwise`` / ``lowbit::dequantize_blockwise``: 8-bit codes into a 256-entry map."""

import torch

from . import blockwise
from .checks import check_blocksize, check_code, check_dtype, check_dtype_arg, check_numel, check_same_device
from .registry import register_fake, register_reference


def _check_quantize(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    check_dtype(A, "A")
    check_code(code)
    check_blocksize(blocksize)
    check_same_device(A=A, code=code)


def check_dequantize(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    check_dtype(A, "A", (torch.uint8,))
    check_dtype(absmax, "absmax", (torch.float32,))
    check_code(code)
    check_blocksize(blocksize)
    check_numel(absmax, "absmax", blockwise.num_blocks(A.numel(), blocksize), f"one per block of {blocksize}")
    check_same_device(A=A, absmax=absmax, code=code)


@register_fake("quantize_blockwise")
def _(A, code, blocksize, seed=None):
    _check_quantize(A, code, blocksize)
    absmax = A.new_empty(blockwise.num_blocks(A.numel(), blocksize), dtype=torch.float32)
    return torch.empty_like(A, dtype=torch.uint8, memory_format=torch.contiguous_format), absmax


@register_reference("quantize_blockwise")
def _(A, code, blocksize, seed=None):
    _check_quantize(A, code, blocksize)
    normalized, absmax = blockwise.normalize(blockwise.blocks(A, blocksize))
    if seed is None:
        indices = blockwise.nearest(normalized, code)
    else:
        indices = blockwise.stochastic(normalized, code, seed)
    return indices.reshape(-1)[: A.numel()].to(torch.uint8).view(A.shape), absmax


@register_fake("dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    check_dequantize(A, absmax, code, blocksize)
    check_dtype_arg(dtype, "dtype")
    return torch.empty_like(A, dtype=dtype, memory_format=torch.contiguous_format)


@register_reference("dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    check_dequantize(A, absmax, code, blocksize)
    check_dtype_arg(dtype, "dtype")
    return decode(A, absmax, code, blocksize).to(dtype).view(A.shape)


def decode(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flat float32 values ``code[A] * absmax[block]``."""
    values = code[A.reshape(-1).long()]
    return values * blockwise.expand_absmax(absmax, A.numel(), blocksize)
