"""Int8 matmul ops: ``int8_linear_matmul`` (int32 accumulate), ``int8_mm_dequant`` (the scale/bias
epilogue) and ``int8_scaled_mm`` (both in one op).

Shapes: ``A (..., k)`` int8 rows, ``B (n, k)`` int8 weight, output ``(..., n)``. The epilogue computes
``A * row_stats * col_stats / 127**2 + bias`` in float32 and casts to ``dtype`` (default float16).
"""

import math

import torch

from .checks import check_dtype, check_dtype_arg, check_same_device
from .int8_vectorwise_quant import as_rows
from .registry import register_fake, register_reference

_INV_127_SQUARED = 1.0 / (127 * 127)


def _check_matmul(A: torch.Tensor, B: torch.Tensor) -> None:
    check_dtype(A, "A", (torch.int8,))
    check_dtype(B, "B", (torch.int8,))
    if B.dim() != 2 or A.dim() == 0 or A.shape[-1] != B.shape[1]:
        raise ValueError(f"A must be (..., k) and B (n, k), got A {list(A.shape)} and B {list(B.shape)}")
    check_same_device(A=A, B=B)


def _check_dequant(out_shape, row_stats, col_stats, dtype, bias) -> None:
    """Checks of the epilogue's arguments for an int32 product of shape ``out_shape``."""
    check_dtype(row_stats, "row_stats", (torch.float32,))
    check_dtype(col_stats, "col_stats", (torch.float32,))
    if len(out_shape) == 0:
        raise ValueError("A must have at least one dimension")
    cols = out_shape[-1]
    rows = math.prod(out_shape[:-1])
    if row_stats.numel() != rows or col_stats.numel() != cols:
        raise ValueError(
            f"row_stats must have {rows} and col_stats {cols} elements for a product of shape {list(out_shape)}, "
            f"got {row_stats.numel()} and {col_stats.numel()}"
        )
    if dtype is not None:
        check_dtype_arg(dtype, "dtype")
    if bias is not None:
        check_dtype(bias, "bias")
        if bias.numel() != cols:
            raise ValueError(f"bias must have {cols} elements, got {bias.numel()}")


def _int_mm_accepts(rows: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` handles these shapes (CUDA: k and n multiples of 8; CPU: k > 1)."""
    k, n = B.shape[1], B.shape[0]
    if rows.is_cuda:
        return k % 8 == 0 and n % 8 == 0 and k > 0 and n > 0
    return k > 1 and n > 0


def _matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    rows = as_rows(A)
    if rows.shape[0] and _int_mm_accepts(rows, B):
        # CUDA's _int_mm needs more than 16 rows: pad with zero rows and drop them after.
        padded = torch.nn.functional.pad(rows, (0, 0, 0, max(0, 17 - rows.shape[0]))) if rows.is_cuda else rows
        out = torch._int_mm(padded.contiguous(), B.contiguous().t())[: rows.shape[0]]
    else:
        # exact: every partial sum is below k * 128 * 128, far under 2**53
        out = (rows.double() @ B.double().t()).to(torch.int32)
    return out.view(*A.shape[:-1], B.shape[0])


def _dequant(A, row_stats, col_stats, dtype, bias) -> torch.Tensor:
    out = as_rows(A).float() * row_stats.view(-1, 1) * col_stats.view(1, -1) * _INV_127_SQUARED
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype or torch.float16).view(A.shape)


@register_fake("int8_linear_matmul")
def _(A, B):
    _check_matmul(A, B)
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@register_reference("int8_linear_matmul")
def _(A, B):
    _check_matmul(A, B)
    return _matmul(A, B)


@register_fake("int8_mm_dequant")
def _(A, row_stats, col_stats, dtype=None, bias=None):
    _check_mm_dequant(A, row_stats, col_stats, dtype, bias)
    return torch.empty_like(A, dtype=dtype or torch.float16, memory_format=torch.contiguous_format)


@register_reference("int8_mm_dequant")
def _(A, row_stats, col_stats, dtype=None, bias=None):
    _check_mm_dequant(A, row_stats, col_stats, dtype, bias)
    return _dequant(A, row_stats, col_stats, dtype, bias)


def _check_mm_dequant(A, row_stats, col_stats, dtype, bias) -> None:
    check_dtype(A, "A", (torch.int32,))
    _check_dequant(A.shape, row_stats, col_stats, dtype, bias)
    check_same_device(A=A, row_stats=row_stats, col_stats=col_stats, bias=bias)


def _check_scaled(A, B, row_stats, col_stats, bias, dtype) -> None:
    _check_matmul(A, B)
    _check_dequant((*A.shape[:-1], B.shape[0]), row_stats, col_stats, dtype, bias)
    check_same_device(A=A, row_stats=row_stats, col_stats=col_stats, bias=bias)


@register_fake("int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype=None):
    _check_scaled(A, B, row_stats, col_stats, bias, dtype)
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16)


@register_reference("int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype=None):
    _check_scaled(A, B, row_stats, col_stats, bias, dtype)
    return _dequant(_matmul(A, B), row_stats, col_stats, dtype, bias)
