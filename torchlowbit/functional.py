"""The bitsandbytes functional API (``bnb.functional``) on top of the ``torch.ops.lowbit`` operators."""

import json
from typing import Any

import torch

from .codebooks import (
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    estimate_quantiles,
    get_4bit_code,
)
from .ops.checks import FLOAT_DTYPES

__all__ = [
    "QuantState", "create_dynamic_map", "create_fp8_map", "create_linear_map", "create_normal_map",
    "dequantize_4bit", "dequantize_blockwise", "dequantize_fp4", "dequantize_nf4", "estimate_quantiles",
    "gemv_4bit", "get_4bit_type", "igemm", "int8_double_quant", "int8_linear_matmul", "int8_mm_dequant",
    "int8_vectorwise_dequant", "int8_vectorwise_quant", "quantize_4bit", "quantize_blockwise", "quantize_fp4",
    "quantize_nf4",
]  # fmt: skip

_NESTED_BLOCKSIZE = 256
_DYNAMIC_MAPS: dict[torch.device, torch.Tensor] = {}


def _dynamic_map(device: torch.device) -> torch.Tensor:
    """The signed dynamic map, built once per device."""
    if device not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[device] = create_dynamic_map().to(device)
    return _DYNAMIC_MAPS[device]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in quant state")
    return dtype


class QuantState:
    """The state needed to dequantize a blockwise-quantized tensor (4-bit or 8-bit).

    ``offset`` and ``state2`` are set for double quantization (``nested``): then ``absmax`` holds uint8
    codes of ``absmax - offset`` quantized by ``state2``; ``offset`` is a float32 0-d tensor on the
    state's device.
    """

    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type", "blocksize",
        "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]  # fmt: skip

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | float | None = None,
        state2: "QuantState | None" = None,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = None if offset is None else torch.as_tensor(offset, dtype=torch.float32, device=absmax.device)
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, idx: int) -> Any:
        """Legacy list view: ``[absmax, shape, dtype, blocksize, [offset, state2], quant_type]``."""
        if self.nested:
            items = [self.absmax, self.shape, self.dtype, self.blocksize, [self.offset, self.state2], self.quant_type]
        else:
            items = [self.absmax, self.shape, self.dtype, self.blocksize, None, self.quant_type]
        return items[idx]

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str) -> "QuantState":
        """Rebuild a 4-bit state from ``as_dict`` output (packed or not), key prefixes such as ``weight.`` allowed."""
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if not packed_keys and "quant_type" not in qs_dict:
            raise ValueError("expected packed or unpacked quant_state items, found neither")
        if len(packed_keys) > 1 or (packed_keys and packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys):
            raise ValueError(
                f"expected exactly one packed quant_state key ending in one of {cls.valid_qs_type_keys}, "
                f"got {packed_keys}"
            )
        if packed_keys:
            qs_dict.update(_unpack_dict(qs_dict.pop(packed_keys[0])))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"unexpected quant_state keys {sorted(unknown)}; accepted: {cls.valid_qs_keys}")
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - set(qs_dict)
        if missing:
            raise ValueError(f"quant_state is missing keys {sorted(missing)}")
        if qs_dict["quant_type"] not in cls.valid_quant_types:
            raise ValueError(f"quant_type must be one of {cls.valid_quant_types}, got {qs_dict['quant_type']!r}")
        nested = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")
        if any(k in qs_dict for k in nested) and not all(k in qs_dict for k in nested):
            missing = sorted(set(nested) - set(qs_dict))
            raise ValueError(f"a nested quant_state needs all of {nested}, missing {missing}")
        offset = state2 = None
        if "nested_absmax" in qs_dict:
            offset = float(qs_dict["nested_offset"])
            state2 = cls(
                absmax=qs_dict["nested_absmax"].to(device),
                blocksize=qs_dict["nested_blocksize"],
                code=qs_dict["nested_quant_map"].to(device),
                dtype=_dtype_from_name(qs_dict["nested_dtype"]),
            )
        return cls(
            quant_type=qs_dict["quant_type"],
            absmax=qs_dict["absmax"].to(device),
            blocksize=qs_dict["blocksize"],
            code=qs_dict["quant_map"].to(device),
            dtype=_dtype_from_name(qs_dict["dtype"]),
            shape=torch.Size(qs_dict["shape"]) if qs_dict["shape"] is not None else None,
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict; ``packed=True`` keeps only tensors, the rest JSON-encoded in one uint8 tensor."""
        qs_dict: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": None if self.shape is None else tuple(self.shape),
        }
        if self.nested:
            qs_dict.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return qs_dict
        tensors = {k: v for k, v in qs_dict.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in qs_dict.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = _pack_dict(others)
        return tensors

    def to(self, device: torch.device | str) -> "QuantState":
        """Move the tensors to ``device`` in place; returns self."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return False
        return (
            _tensors_equal(self.absmax, other.absmax)
            and self.shape == other.shape
            and _tensors_equal(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and _tensors_equal(self.offset, other.offset)
            and self.state2 == other.state2
        )

    __hash__ = None


def _tensors_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a.cpu(), b.cpu(), atol=1e-6)


def _pack_dict(d: dict[str, Any]) -> torch.Tensor:
    """JSON bytes; floats have a fixed width (9 significant digits: exact for float32), so the tensor's length
    depends only on the layout, as ``torch.distributed.checkpoint`` needs to load it in place."""
    floats = {k: v for k, v in d.items() if isinstance(v, float)}
    text = json.dumps({k: f"@{k}" if k in floats else v for k, v in d.items()})
    for k, v in floats.items():
        text = text.replace(f'"@{k}"', f"{v:.8e}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


def _into(out: torch.Tensor | None, result: torch.Tensor, name: str = "out") -> torch.Tensor:
    """Write ``result`` into the caller's buffer ``out`` (argument ``name``), which must match it exactly."""
    if out is None:
        return result
    if out.dtype != result.dtype:  # a cast would silently change codes or scales
        raise TypeError(f"{name} must have dtype {result.dtype}, got {out.dtype}")
    if out.shape != result.shape:
        raise ValueError(f"{name} must have shape {list(result.shape)}, got {list(out.shape)}")
    return out.copy_(result)


def _result_dtype(out: torch.Tensor | None, default: torch.dtype) -> torch.dtype:
    """The dtype a dequantizing function writes: ``out``'s when given (a 16- or 32-bit float), else ``default``."""
    if out is None:
        return default
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"out must have dtype float16, bfloat16 or float32, got {out.dtype}")
    return out.dtype


# 8-bit blockwise ---------------------------------------------------------------------------------------------


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization into ``code`` (default: the signed dynamic map)."""
    # the state owns a copy of its code, so editing one state never touches the shared default map
    code = (_dynamic_map(A.device) if code is None else code).to(A.device, copy=True)
    quantized, block_absmax = torch.ops.lowbit.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = block_absmax.mean()
        qabsmax, state2 = quantize_blockwise(block_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qabsmax, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_into(absmax, block_absmax, "absmax"), code=code, blocksize=blocksize, dtype=A.dtype)
    return _into(out, quantized), state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: from a ``quant_state``, or from ``absmax`` and ``code``."""
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        code = _dynamic_map(A.device) if code is None else code
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    _checked_state(quant_state, "quant_state", four_bit=False)
    block_absmax = quant_state.absmax
    if quant_state.nested:
        block_absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    dtype = _result_dtype(out, quant_state.dtype)
    result = torch.ops.lowbit.dequantize_blockwise(
        A, block_absmax.float(), quant_state.code.to(A.device), quant_state.blocksize, dtype
    )
    return _into(out, result)


# 4-bit ------------------------------------------------------------------------------------------------------


def get_4bit_type(typename: str, device: torch.device | str | None = None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 code of ``typename`` ('nf4' or 'fp4'), indexed by nibble value."""
    return get_4bit_code(typename, device=device)


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit (NF4/FP4) quantization; ``compress_statistics`` double-quantizes the absmax."""
    blocksize = 64 if blocksize is None else blocksize
    packed, block_absmax = torch.ops.lowbit.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_code(quant_type, device=A.device)
    if compress_statistics:
        offset = block_absmax.mean()
        qabsmax, state2 = quantize_blockwise(block_absmax - offset, blocksize=_NESTED_BLOCKSIZE)
        state = QuantState(
            absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type,
            offset=offset, state2=state2,
        )  # fmt: skip
    else:
        state = QuantState(
            absmax=_into(absmax, block_absmax, "absmax"), shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
            quant_type=quant_type,
        )  # fmt: skip
    return _into(out, packed), state


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def _checked_state(state: Any, name: str, four_bit: bool) -> QuantState:
    """``state`` (the argument ``name``) if it is a ``QuantState`` (of 4-bit codes where ``four_bit``)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
    if four_bit and state.quant_type not in QuantState.valid_quant_types:
        raise ValueError(
            f"{name} must be the state of 4-bit codes (quant_type 'nf4' or 'fp4', from quantize_4bit), got "
            f"quant_type {state.quant_type!r}"
        )
    return state


def _nested_args(quant_state: QuantState, name: str = "quant_state") -> tuple:
    """The (absmax, nested_absmax, nested_code, nested_offset, nested_blocksize) arguments of the 4-bit ops."""
    _checked_state(quant_state, name, four_bit=True)
    if not quant_state.nested:
        return quant_state.absmax, None, None, None, _NESTED_BLOCKSIZE
    state2 = quant_state.state2
    return quant_state.absmax, state2.absmax, state2.code, quant_state.offset, state2.blocksize


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Inverse of ``quantize_4bit``: from a ``quant_state``, or from ``absmax`` with ``out`` giving shape and dtype."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=64 if blocksize is None else blocksize,
            quant_type=quant_type,
        )  # fmt: skip
    block_absmax, nested_absmax, nested_code, offset, nested_blocksize = _nested_args(quant_state)
    dtype = _result_dtype(out, quant_state.dtype)
    result = torch.ops.lowbit.dequantize_4bit(
        A, block_absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), dtype,
        nested_absmax, nested_code, offset, nested_blocksize,
    )  # fmt: skip
    return _into(out, result)


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> torch.Tensor:
    """``A @ dequantize_4bit(B, state).T`` for the packed ``(out, in)`` weight ``B`` (any number of rows of A)."""
    if state is None:
        raise ValueError("gemv_4bit needs the weight's QuantState as state=")
    block_absmax, nested_absmax, nested_code, offset, nested_blocksize = _nested_args(state, "state")
    result = torch.ops.lowbit.gemm_4bit(
        A, B, block_absmax, state.blocksize, state.quant_type, list(state.shape), None,
        nested_absmax, nested_code, offset, nested_blocksize,
    )  # fmt: skip
    return _into(out, result)


# int8 -------------------------------------------------------------------------------------------------------


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-wise absmax int8 quantization: ``(int8, row absmax float32, outlier column indices or None)``."""
    quantized, row_stats, outliers = torch.ops.lowbit.int8_vectorwise_quant(A, threshold)
    outlier_cols = outliers.nonzero().view(-1) if threshold > 0 else None
    return quantized, row_stats, outlier_cols


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Float32 values ``A * stats / 127`` of row-wise int8 ``A``."""
    return A.float() * (stats.float().view(-1, 1) / 127.0).view(*A.shape[:-1], 1)


def int8_double_quant(
    A: torch.Tensor,
    col_stats: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    out_col: torch.Tensor | None = None,
    out_row: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-wise and column-wise int8 quantization of 2-d ``A``: ``(out_row, out_col, row_stats, col_stats, cols)``."""
    rows = A.reshape(-1, A.shape[-1])
    quant_row, stats_row, outlier_cols = int8_vectorwise_quant(rows, threshold)
    # Column-wise, only the outlier entries themselves are left out (zeroed), not whole rows or columns.
    inliers = rows.masked_fill(rows.abs() >= threshold, 0) if threshold > 0 else rows
    quant_col, stats_col, _ = torch.ops.lowbit.int8_vectorwise_quant(inliers.t(), 0.0)
    quant_col = quant_col.t()
    return (
        _into(out_row, quant_row.view(A.shape), "out_row"),
        _into(out_col, quant_col.reshape(A.shape), "out_col"),
        _into(row_stats, stats_row, "row_stats"),
        _into(col_stats, stats_col, "col_stats"),
        outlier_cols,
    )


def int8_linear_matmul(
    A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """``A @ B.T`` of int8 ``A (..., k)`` and ``B (n, k)``, accumulated in int32."""
    if dtype != torch.int32:
        raise TypeError(f"dtype must be torch.int32, got {dtype}")
    return _into(out, torch.ops.lowbit.int8_linear_matmul(A, B))


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize an int32 product: ``A * row_stats * col_stats / 127**2 + bias`` (float16, or ``out``'s dtype)."""
    dtype = _result_dtype(out, torch.float16)
    return _into(out, torch.ops.lowbit.int8_mm_dequant(A, row_stats, col_stats, dtype, bias))


def igemm(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
) -> torch.Tensor:
    """int8 matmul ``A @ B`` (each optionally transposed) with int32 accumulation; ``A`` may be 3-d."""
    if transposed_A:
        A = A.transpose(-1, -2)
    weight = B if transposed_B else B.t()
    if weight.dim() != 2:
        raise ValueError(f"B must be 2-d, got shape {list(B.shape)}")
    return _into(out, torch.ops.lowbit.int8_linear_matmul(A, weight))
