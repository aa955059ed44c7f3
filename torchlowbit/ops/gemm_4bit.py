"""``lowbit::gemm_4bit``: ``A @ dequantize(B).T + bias`` for a packed 4-bit ``(out, in)`` weight.

Accuracy contract: products accumulate in float32; a kernel may round the dequantized weight to A's
dtype first (the CUDA kernels do for 16-bit A), so the error is within ``eps(A.dtype) * |A| @ |W|.T``
plus the rounding of the output. The reference computes in float32 throughout.
"""

import math

import torch

from .checks import check_dtype, check_same_device
from .quantize_4bit import check_packed, decode, decode_absmax
from .registry import register_fake, register_reference


def _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset,
           nested_blocksize):  # fmt: skip
    check_dtype(A, "A")
    check_packed(
        B, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset, nested_blocksize, "B"
    )
    if len(shape) != 2:
        raise ValueError(f"shape must be the 2-d (out_features, in_features) of the weight, got {list(shape)}")
    if A.dim() == 0 or A.shape[-1] != shape[1]:
        raise ValueError(f"A must have shape (..., {shape[1]}) to multiply a weight of shape {list(shape)}, "
                         f"got {list(A.shape)}")  # fmt: skip
    if bias is not None:
        check_dtype(bias, "bias")
        if bias.shape != (shape[0],):
            raise ValueError(f"bias must have shape ({shape[0]},), got {list(bias.shape)}")
    check_same_device(A=A, B=B, bias=bias)


@register_fake("gemm_4bit")
def _(A, B, absmax, blocksize, quant_type, shape, bias=None, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):  # fmt: skip
    _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset,
           nested_blocksize)  # fmt: skip
    return A.new_empty((*A.shape[:-1], shape[0]))


@register_reference("gemm_4bit")
def _(A, B, absmax, blocksize, quant_type, shape, bias=None, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):  # fmt: skip
    _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset,
           nested_blocksize)  # fmt: skip
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    weight = decode(B, absmax, blocksize, quant_type, math.prod(shape)).view(shape)
    out = A.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)


def _setup_context(ctx, inputs, output):
    _, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset, nested_blocksize = (
        inputs
    )
    ctx.save_for_backward(B, absmax, nested_absmax, nested_code, nested_offset)
    ctx.weight_args = (blocksize, quant_type, shape, nested_blocksize)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    """Gradients for A (``grad @ W``) and bias (summed ``grad``); the quantized weight is frozen."""
    B, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize = ctx.weight_args
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = torch.ops.lowbit.dequantize_4bit(
            B, absmax, blocksize, quant_type, shape, grad.dtype, nested_absmax, nested_code, nested_offset,
            nested_blocksize,
        )  # fmt: skip
        grad_A = grad @ weight
    if ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("lowbit::gemm_4bit", _backward, setup_context=_setup_context)
