"""``lowbit::int8_mixed_linear``: the whole LLM.int8 matmul with outlier decomposition in one op.

``A (..., k)`` is quantized per row to int8 (outlier columns zeroed) and multiplied with the int8
weight ``CB (n, k)`` (per-row scales ``SCB``); the outlier columns of ``A`` are multiplied in floating
point with the dequantized weight columns and added. The output shape depends only on the input
shapes; which columns were outliers comes back as a ``(k,)`` boolean mask.
"""

import torch

from .checks import check_dtype, check_int8_weight, check_same_device
from .int8_vectorwise_quant import as_rows
from .registry import register_fake, register_reference


def _check(A, CB, SCB, bias, threshold) -> None:
    check_dtype(A, "A")
    check_int8_weight(CB, SCB)
    if A.dim() == 0 or A.shape[-1] != CB.shape[1]:
        raise ValueError(f"A must be (..., k) and CB (n, k), got A {list(A.shape)} and CB {list(CB.shape)}")
    if bias is not None:
        check_dtype(bias, "bias")
        if bias.shape != (CB.shape[0],):
            raise ValueError(f"bias must have shape ({CB.shape[0]},), got {list(bias.shape)}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables outlier decomposition), got {threshold}")
    check_same_device(A=A, CB=CB, SCB=SCB, bias=bias)


@register_fake("int8_mixed_linear")
def _(A, CB, SCB, bias=None, threshold=0.0):
    _check(A, CB, SCB, bias, threshold)
    return A.new_empty((*A.shape[:-1], CB.shape[0])), A.new_empty(A.shape[-1], dtype=torch.bool)


@register_reference("int8_mixed_linear")
def _(A, CB, SCB, bias=None, threshold=0.0):
    _check(A, CB, SCB, bias, threshold)
    CA, SCA, outlier_cols = torch.ops.lowbit.int8_vectorwise_quant(A, threshold)
    out = torch.ops.lowbit.int8_scaled_mm(CA, CB, SCA, SCB, bias, torch.float32)
    if threshold == 0:
        return out.to(A.dtype), outlier_cols
    if A.is_cuda and torch.cuda.is_current_stream_capturing():
        # a CUDA graph cannot capture nonzero's host sync: take all columns, the others zeroed
        rows, weight = as_rows(A).float() * outlier_cols, CB.float()
    else:
        columns = outlier_cols.nonzero().view(-1)
        rows, weight = as_rows(A).index_select(1, columns).float(), CB.index_select(1, columns).float()
    out = out + (rows @ (weight * (SCB / 127.0)[:, None]).T).view(out.shape)
    return out.to(A.dtype), outlier_cols


def _setup_context(ctx, inputs, output):
    A, CB, SCB, bias, threshold = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad, _grad_mask):
    """Gradients for A (``grad @ dequantize(CB)``) and bias; the int8 weight is frozen."""
    CB, SCB = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_A = grad @ (CB.float() * (SCB / 127.0)[:, None]).to(grad.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, CB.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, grad_bias, None


torch.library.register_autograd("lowbit::int8_mixed_linear", _backward, setup_context=_setup_context)
