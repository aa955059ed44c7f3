"""``lowbit::int8_vectorwise_quant``: per-row absmax int8 quantization with outlier columns.

With ``threshold > 0``, elements with ``|x| >= threshold`` are outliers: they are left out of their row's
absmax, and every column that holds one is zeroed in the int8 output (LLM.int8 multiplies those
columns in 16-bit instead). The outlier columns come back as a boolean mask, so shapes stay static.
"""

import math

import torch

from .checks import check_dtype
from .registry import register_fake, register_reference


def as_rows(A: torch.Tensor) -> torch.Tensor:
    """``A`` as 2-d ``(rows, A.shape[-1])``, rows being all leading dimensions (also when a size is 0)."""
    return A.reshape(math.prod(A.shape[:-1]), A.shape[-1])


def _check(A: torch.Tensor, threshold: float) -> None:
    check_dtype(A, "A")
    if A.dim() == 0:
        raise ValueError("A must have at least one dimension (rows are all but the last)")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables outlier detection), got {threshold}")


@register_fake("int8_vectorwise_quant")
def _(A, threshold=0.0):
    _check(A, threshold)
    rows = math.prod(A.shape[:-1])
    quantized = torch.empty_like(A, dtype=torch.int8, memory_format=torch.contiguous_format)
    return quantized, A.new_empty(rows, dtype=torch.float32), A.new_empty(A.shape[-1], dtype=torch.bool)


@register_reference("int8_vectorwise_quant")
def _(A, threshold=0.0):
    _check(A, threshold)
    rows = as_rows(A).float()
    magnitude = rows.abs()
    if threshold > 0:
        outliers = magnitude >= threshold
        magnitude = magnitude.masked_fill(outliers, 0)
        outlier_cols = outliers.any(dim=0)
    else:
        outlier_cols = torch.zeros(A.shape[-1], dtype=torch.bool, device=A.device)
    row_stats = magnitude.amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    scale = torch.where(row_stats > 0, 127.0 / row_stats, torch.zeros_like(row_stats))
    quantized = torch.round(rows * scale[:, None]).masked_fill(outlier_cols, 0)
    return quantized.to(torch.int8).view(A.shape), row_stats, outlier_cols
