"""``lowbit::quantize_4bit`` / ``lowbit::dequantize_4bit``: NF4/FP4 codes, two per byte, high nibble first.

Packed bytes are stored in ``quant_storage`` (uint8, or reinterpreted as fp16/bf16/fp32), shaped
``(count, 1)``; a byte buffer whose length is not a multiple of the storage item size is zero-padded.
"""

import math

import torch

from .. import codebooks
from . import blockwise
from .checks import check_blocksize, check_code, check_dtype, check_dtype_arg, check_numel, check_same_device
from .quantize_blockwise import decode as decode_blockwise
from .registry import register_fake, register_reference

QUANT_STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def check_quant_type(quant_type: str) -> None:
    if quant_type not in codebooks.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {codebooks.QUANT_TYPES}, got {quant_type!r}")


def packed_count(numel: int, quant_storage: torch.dtype) -> int:
    """Number of ``quant_storage`` elements that hold ``numel`` packed 4-bit codes."""
    return blockwise.num_blocks(blockwise.num_blocks(numel, 2), quant_storage.itemsize)


def _check_quantize(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> None:
    check_dtype(A, "A")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_dtype_arg(quant_storage, "quant_storage", QUANT_STORAGE_DTYPES)


def check_packed(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape, nested_absmax, nested_code,
    nested_offset, nested_blocksize: int, name: str = "A", prefix: str = "",
) -> None:  # fmt: skip
    """Checks of a packed weight (argument ``name``) with its (possibly double-quantized) absmax; the names in the
    messages start with ``prefix`` (a module's weight: ``"Linear4bit.weight."``)."""
    name, absmax_name = prefix + name, prefix + "absmax"
    nabs_name, ncode_name, noff_name = prefix + "nested_absmax", prefix + "nested_code", prefix + "nested_offset"
    check_dtype(A, name, QUANT_STORAGE_DTYPES)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if any(not isinstance(s, torch.SymInt) and s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {list(shape)}")
    numel = math.prod(shape)
    expected = packed_count(numel, A.dtype) * A.dtype.itemsize
    if A.numel() * A.dtype.itemsize != expected:
        raise ValueError(
            f"{name} must hold {expected} bytes of packed codes for shape {list(shape)}, "
            f"got {A.numel() * A.dtype.itemsize}"
        )
    check_numel(absmax, absmax_name, blockwise.num_blocks(numel, blocksize), f"one per block of {blocksize}")
    nested = {nabs_name: nested_absmax, ncode_name: nested_code, noff_name: nested_offset}
    check_same_device(**{name: A, absmax_name: absmax}, **nested)
    if not (nested_absmax is None) == (nested_code is None) == (nested_offset is None):
        raise ValueError(
            f"{nabs_name}, {ncode_name} and {noff_name} must be given together (double quantization) or not at all"
        )
    if nested_absmax is None:
        check_dtype(absmax, absmax_name, (torch.float32,))
        return
    check_dtype(absmax, absmax_name, (torch.uint8,))
    check_dtype(nested_absmax, nabs_name, (torch.float32,))
    check_code(nested_code, ncode_name)
    check_dtype(nested_offset, noff_name, (torch.float32,))
    check_numel(nested_offset, noff_name, 1, "the mean subtracted before double quantization")
    check_blocksize(nested_blocksize, "nested_blocksize")
    check_numel(
        nested_absmax, nabs_name, blockwise.num_blocks(absmax.numel(), nested_blocksize),
        f"one per block of {nested_blocksize} absmax codes",
    )  # fmt: skip


def decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize: int) -> torch.Tensor:
    """The float32 block absmax, decoding the double-quantized form when ``nested_absmax`` is given."""
    if nested_absmax is None:
        return absmax
    return decode_blockwise(absmax, nested_absmax, nested_code, nested_blocksize) + nested_offset.reshape(())


def unpack(A: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` 4-bit codes (int64) of a packed buffer of any storage dtype."""
    packed = A.contiguous().view(-1).view(torch.uint8)
    pairs = torch.stack([packed >> 4, packed & 0xF], dim=-1)
    return pairs.view(-1)[:numel].long()


def decode(A, absmax, blocksize: int, quant_type: str, numel: int) -> torch.Tensor:
    """Flat float32 values ``code[nibble] * absmax[block]`` of a packed buffer."""
    code = codebooks.get_4bit_code(quant_type, device=A.device)
    return code[unpack(A, numel)] * blockwise.expand_absmax(absmax, numel, blocksize)


def _encode(normalized: torch.Tensor, quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return blockwise.nearest(normalized, codebooks.get_4bit_code("nf4", device=normalized.device))
    # FP4 is sign-magnitude: the sign bit is set for negative values, even those that round to zero.
    magnitudes = codebooks.get_4bit_code("fp4", device=normalized.device)[:8]
    return blockwise.nearest(normalized.abs(), magnitudes) | ((normalized < 0).long() << 3)


def _pack(codes: torch.Tensor, quant_type: str, quant_storage: torch.dtype) -> torch.Tensor:
    count = packed_count(codes.numel(), quant_storage)
    # Padding holds the code of 0.0, as the original library writes for an odd element count.
    zero_code = codebooks.get_4bit_code(quant_type).tolist().index(0.0)
    padded = torch.nn.functional.pad(codes, (0, 2 * count * quant_storage.itemsize - codes.numel()), value=zero_code)
    pairs = padded.view(-1, 2).to(torch.uint8)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed.view(quant_storage).view(count, 1)


@register_fake("quantize_4bit")
def _(A, blocksize, quant_type, quant_storage):
    _check_quantize(A, blocksize, quant_type, quant_storage)
    packed = A.new_empty((packed_count(A.numel(), quant_storage), 1), dtype=quant_storage)
    return packed, A.new_empty(blockwise.num_blocks(A.numel(), blocksize), dtype=torch.float32)


@register_reference("quantize_4bit")
def _(A, blocksize, quant_type, quant_storage):
    _check_quantize(A, blocksize, quant_type, quant_storage)
    normalized, absmax = blockwise.normalize(blockwise.blocks(A, blocksize))
    codes = _encode(normalized, quant_type).view(-1)[: A.numel()]
    return _pack(codes, quant_type, quant_storage), absmax


@register_fake("dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None, nested_code=None, nested_offset=None,
      nested_blocksize=256):  # fmt: skip
    check_packed(A, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset, nested_blocksize)
    check_dtype_arg(dtype, "dtype")
    return A.new_empty(shape, dtype=dtype)


@register_reference("dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None, nested_code=None, nested_offset=None,
      nested_blocksize=256):  # fmt: skip
    check_packed(A, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset, nested_blocksize)
    check_dtype_arg(dtype, "dtype")
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return decode(A, absmax, blocksize, quant_type, math.prod(shape)).to(dtype).view(shape)
