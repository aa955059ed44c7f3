"""``Int8Params``: an int8 weight quantized per output row, carrying its row scales (``SCB``).

With ``has_fp16_weights=False`` (inference) the weight is stored as ``CB`` (int8, ``(out, in)``) and
``SCB`` (float32 row absmax, ``(out,)``): ``W ~= CB * SCB / 127``. With ``has_fp16_weights=True`` the
weight stays a trainable float ``nn.Parameter`` and is quantized on the fly in each forward.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.checks import check_int8_weight
from .quantized_parameter import QuantizedParameter


@dataclass(frozen=True)
class _MetaInt8:
    dtype: torch.dtype  # of the float weight it stands for


def _quantize(data: torch.Tensor) -> tuple[dict, _MetaInt8]:
    if data.dim() != 2 or not data.is_floating_point():
        raise ValueError(f"data must be a 2-d float weight (out, in), got {data.dtype} {list(data.shape)}")
    CB, SCB, _ = torch.ops.lowbit.int8_vectorwise_quant(data.detach(), 0.0)
    return {"CB": CB, "SCB": SCB}, _MetaInt8(data.dtype)


class Int8Params(QuantizedParameter):
    """A frozen row-wise int8 weight (``CB``, ``SCB``); ``has_fp16_weights=True`` gives a float Parameter.

    The int8 weight never requires grad (``requires_grad`` only applies to float weights).
    """

    inner_names = ("CB", "SCB")
    CB: torch.Tensor
    SCB: torch.Tensor
    meta: _MetaInt8

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: torch.Tensor | None = None,
        SCB: torch.Tensor | None = None,
    ) -> "Int8Params | nn.Parameter":
        if data is None:
            data = torch.empty(0, 0)
        if has_fp16_weights:
            return nn.Parameter(data, requires_grad=requires_grad)
        if isinstance(data, Int8Params):
            return data.detach()
        if CB is not None or SCB is not None:
            return cls.from_quantized(CB, SCB, dtype=data.dtype if data.is_floating_point() else torch.float16)
        return cls._make(*_quantize(data))

    @classmethod
    def from_quantized(cls, CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float16) -> "Int8Params":
        """An ``Int8Params`` from an int8 ``CB (out, in)`` and float32 row scales ``SCB (out,)``."""
        if CB is None or SCB is None:
            raise ValueError("CB and SCB must be given together")
        check_int8_weight(CB, SCB)
        return cls._make({"CB": CB, "SCB": SCB.to(CB.device)}, _MetaInt8(dtype))

    @property
    def has_fp16_weights(self) -> bool:
        return False

    def dequantize(self) -> torch.Tensor:
        """The float weight ``CB * SCB / 127`` in the original dtype."""
        rows = self.CB.float().view(len(self.SCB), -1)  # also right for FSDP's flattened view of the codes
        return (rows * (self.SCB / 127.0)[:, None]).view(self.shape).to(self.meta.dtype)

    def __repr__(self) -> str:
        return f"Int8Params(shape={list(self.shape)}, dtype={self.meta.dtype}, device={self.device})"

    def _quantized_like(self, src: torch.Tensor) -> "Int8Params":
        if not src.is_floating_point() or src.shape != self.shape:
            raise ValueError(
                f"cannot copy a {src.dtype} tensor of shape {list(src.shape)} into {self!r}: give a float tensor "
                f"of shape {list(self.shape)} (it is quantized) or another Int8Params"
            )
        return self._make(*_quantize(src.to(self.device)))

    def check_state(self, owner: str) -> None:
        check_int8_weight(self.CB, self.SCB, prefix=owner + ".")

    def _rows_per_entry(self) -> dict[str, int]:
        return {"CB": 1, "SCB": 1}

    def _layout(self) -> tuple:
        return tuple(self.shape)


torch.serialization.add_safe_globals([_MetaInt8, Int8Params])
