"""``Params4bit``: a packed NF4/FP4 weight that carries its quantization state.

Its inner tensors are the packed codes and the (possibly double-quantized) absmax. The outer tensor
looks like the bitsandbytes parameter, packed bytes of shape ``(count, 1)`` in ``quant_storage``;
``logical_shape`` and ``meta.dtype`` describe the weight it stands for.
"""

import math
from dataclasses import dataclass

import torch

from .. import functional as F
from ..ops.quantize_4bit import QUANT_STORAGE_DTYPES, check_packed, check_quant_type, packed_count
from .quantized_parameter import QuantizedParameter

_NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class _Meta4bit:
    """Metadata of a quantized weight; hashable so that traced graphs can specialize on it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested: bool  # absmax double-quantized: uint8 codes, nested_absmax, nested_code, nested_offset
    nested_blocksize: int = _NESTED_BLOCKSIZE


def _from_quant_state(packed: torch.Tensor, quant_state: F.QuantState) -> tuple[dict, _Meta4bit]:
    inner = {"packed": packed, "absmax": quant_state.absmax}
    if quant_state.nested:
        inner["nested_absmax"] = quant_state.state2.absmax
        inner["nested_code"] = quant_state.state2.code
        inner["nested_offset"] = quant_state.offset.reshape(1)
    nested_blocksize = quant_state.state2.blocksize if quant_state.nested else _NESTED_BLOCKSIZE
    meta = _Meta4bit(
        tuple(quant_state.shape), quant_state.dtype, quant_state.blocksize, quant_state.quant_type,
        quant_state.nested, nested_blocksize,
    )  # fmt: skip
    return inner, meta


def _quantize(data: torch.Tensor, blocksize: int, compress_statistics: bool, quant_type: str,
              quant_storage: torch.dtype) -> tuple[dict, _Meta4bit]:  # fmt: skip
    """Quantize a float weight; on the meta device, only the shapes of the state are made."""
    if data.device.type != "meta":
        packed, state = F.quantize_4bit(
            data, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type,
            quant_storage=quant_storage,
        )  # fmt: skip
        return _from_quant_state(packed, state)
    packed, absmax = torch.ops.lowbit.quantize_4bit(data, blocksize, quant_type, quant_storage)
    inner = {"packed": packed, "absmax": absmax}
    if compress_statistics:
        inner["absmax"] = torch.empty_like(absmax, dtype=torch.uint8)
        blocks = math.ceil(absmax.numel() / _NESTED_BLOCKSIZE)
        inner["nested_absmax"] = absmax.new_empty(blocks)
        inner["nested_code"] = absmax.new_empty(256)
        inner["nested_offset"] = absmax.new_empty(1)
    return inner, _Meta4bit(tuple(data.shape), data.dtype, blocksize, quant_type, compress_statistics)


class Params4bit(QuantizedParameter):
    """A frozen 4-bit weight (NF4 or FP4, blockwise absmax, optional double quantization).

    ``Params4bit(data=float_weight, ...)`` quantizes ``data`` on its device at construction (on the meta
    device it only records shapes); ``quant_state`` is given with already packed ``data``.
    """

    inner_names = ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset")
    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    nested_offset: torch.Tensor | None
    meta: _Meta4bit

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: F.QuantState | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: torch.nn.Module | None = None,
        **kwargs,
    ) -> "Params4bit":
        if requires_grad:
            raise ValueError("requires_grad must be False: Params4bit holds frozen quantized weights")
        if data is None:
            data = torch.empty(0)
        if isinstance(data, Params4bit):
            return data.detach()
        if quant_state is not None:
            inner, meta = _from_quant_state(data, F._checked_state(quant_state, "quant_state", four_bit=True))
        else:
            check_quant_type(quant_type)
            if quant_storage not in QUANT_STORAGE_DTYPES:
                raise TypeError(f"quant_storage must be one of {QUANT_STORAGE_DTYPES}, got {quant_storage}")
            inner, meta = _quantize(data.detach(), blocksize, compress_statistics, quant_type, quant_storage)
        return cls._make(inner, meta)

    # --- the bitsandbytes attributes -------------------------------------------------------------------------

    @property
    def quant_state(self) -> F.QuantState:
        """A ``functional.QuantState`` view of this weight's state (a fresh object on each access)."""
        meta = self.meta
        state2 = None
        if meta.nested:
            state2 = F.QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=meta.nested_blocksize, dtype=torch.float32
            )
        return F.QuantState(
            absmax=self.absmax, shape=meta.shape, code=F.get_4bit_type(meta.quant_type, device=self.device),
            blocksize=meta.blocksize, quant_type=meta.quant_type, dtype=meta.dtype,
            offset=None if self.nested_offset is None else self.nested_offset.reshape(()), state2=state2,
        )  # fmt: skip

    @property
    def blocksize(self) -> int:
        return self.meta.blocksize

    @property
    def quant_type(self) -> str:
        return self.meta.quant_type

    @property
    def compress_statistics(self) -> bool:
        return self.meta.nested

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the weight these codes stand for, e.g. ``(out_features, in_features)``."""
        return self.meta.shape

    @property
    def bnb_quantized(self) -> bool:
        return True

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, torch.Tensor],
        requires_grad: bool = False,
        device: torch.device | str = "cuda",
        **kwargs,
    ) -> "Params4bit":
        """Rebuild a weight from packed ``data`` and the ``weight.*`` entries of a bitsandbytes state dict."""
        quant_state = F.QuantState.from_dict(qs_dict=quantized_stats, device=device)
        _check_packed_matches(data, quant_state)
        return cls(data.to(device), requires_grad=requires_grad, quant_state=quant_state)

    def dequantize(self) -> torch.Tensor:
        """The float weight of ``logical_shape`` in the original dtype."""
        return torch.ops.lowbit.dequantize_4bit(
            self.packed, self.absmax, self.blocksize, self.quant_type, list(self.logical_shape), self.meta.dtype,
            *self.nested_args(),
        )  # fmt: skip

    def with_quant_storage(self, quant_storage: torch.dtype) -> "Params4bit":
        """The same codes stored in ``quant_storage`` (the bytes reinterpreted, zero-code padded to fit)."""
        if quant_storage == self.quant_storage:
            return self
        numel = math.prod(self.meta.shape)
        data = self.packed.reshape(-1).view(torch.uint8)[: -(-numel // 2)]
        zero = F.get_4bit_type(self.quant_type).tolist().index(0.0)
        pad = packed_count(numel, quant_storage) * quant_storage.itemsize - data.numel()
        data = torch.nn.functional.pad(data, (0, pad), value=(zero << 4) | zero)
        return self._make({**self.inner(), "packed": data.view(quant_storage).view(-1, 1)}, self.meta)

    def nested_args(self) -> tuple:
        """The (nested_absmax, nested_code, nested_offset, nested_blocksize) arguments of the 4-bit ops."""
        return self.nested_absmax, self.nested_code, self.nested_offset, self.meta.nested_blocksize

    def __repr__(self) -> str:
        meta = self.meta
        return (
            f"Params4bit(shape={list(meta.shape)}, quant_type={meta.quant_type!r}, blocksize={meta.blocksize}, "
            f"nested={meta.nested}, quant_storage={self.quant_storage}, dtype={meta.dtype}, device={self.device})"
        )

    def _quantized_like(self, src: torch.Tensor) -> "Params4bit":
        if not src.is_floating_point() or tuple(src.shape) != self.meta.shape:
            raise ValueError(
                f"cannot copy a {src.dtype} tensor of shape {list(src.shape)} into {self!r}: give a float tensor "
                f"of shape {list(self.meta.shape)} (it is quantized) or another Params4bit"
            )
        meta = self.meta
        inner, new_meta = _quantize(
            src.to(self.device), meta.blocksize, meta.nested, meta.quant_type, self.quant_storage
        )
        return self._make(inner, new_meta)

    def check_state(self, owner: str) -> None:
        check_packed(self.packed, self.absmax, self.blocksize, self.quant_type, self.logical_shape,
                     *self.nested_args(), name="packed", prefix=owner + ".")  # fmt: skip

    def _rows_per_entry(self) -> dict[str, int]:
        return {"packed": 1, "absmax": self.blocksize // (2 * self.quant_storage.itemsize)}

    def _layout(self) -> tuple:
        meta = self.meta
        return meta.shape, meta.quant_type, meta.blocksize, meta.nested, meta.nested_blocksize, self.quant_storage


def _check_packed_matches(packed: torch.Tensor, quant_state: F.QuantState) -> None:
    expected = packed_count(math.prod(quant_state.shape), packed.dtype)
    if packed.numel() != expected:
        raise ValueError(
            f"packed weight has {packed.numel()} elements of {packed.dtype}, but the quant state's shape "
            f"{list(quant_state.shape)} needs {expected}"
        )


torch.serialization.add_safe_globals([_Meta4bit, Params4bit])
