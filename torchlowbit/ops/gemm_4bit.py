"""``lowbit::gemm_4bit``: ``A @ dequantize(B).T + bias`` for a packed 4-bit ``(out, in)`` weight."""

import math

from .checks import check_dtype, check_same_device
from .quantize_4bit import check_packed, decode, decode_absmax
from .registry import register_fake, register_reference


def _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_blocksize):
    check_dtype(A, "A")
    check_packed(B, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_blocksize)
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
      nested_offset=0.0, nested_blocksize=256):  # fmt: skip
    _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_blocksize)
    return A.new_empty((*A.shape[:-1], shape[0]))


@register_reference("gemm_4bit")
def _(A, B, absmax, blocksize, quant_type, shape, bias=None, nested_absmax=None, nested_code=None,
      nested_offset=0.0, nested_blocksize=256):  # fmt: skip
    _check(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_blocksize)
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    weight = decode(B, absmax, blocksize, quant_type, math.prod(shape)).view(shape)
    out = A.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)
