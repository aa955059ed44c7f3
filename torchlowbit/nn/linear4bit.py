"""``Linear4bit`` (and ``LinearNF4``, ``LinearFP4``): a linear layer over a frozen 4-bit weight."""

import re
import warnings

import torch
from torch import nn

from .. import _dtensor
from .. import functional as F
from ..ops.checks import FLOAT_DTYPES
from .frozen_op_call import call_op
from .layer_input import check_input, check_weight_shape
from .params4bit import Params4bit
from .weight_loading import LoadsQuantizedWeight

_SLOW_COMPUTE_DTYPE = (
    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 (default). "
    "This will lead to slow {}."
)


def _warn_once(message: str) -> None:
    """Warn, then silence the same message (the original library's warn-once behaviour)."""
    warnings.warn(message, UserWarning, stacklevel=3)
    warnings.filterwarnings("ignore", message=re.escape(message))


class Linear4bit(LoadsQuantizedWeight, nn.Linear):
    """``y = x @ dequantize(W).T + b`` with ``W`` stored as NF4/FP4 codes (blockwise absmax, blocksize 64)."""

    _state_roots = ("weight",)

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data, requires_grad=False, compress_statistics=compress_statistics, quant_type=quant_type,
            quant_storage=quant_storage,
        )  # fmt: skip
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"compute_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {compute_dtype!r}"
            )
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage

    def _check_weight(self, weight: torch.Tensor | None = None) -> Params4bit:
        weight = Params4bit.checked(self.weight if weight is None else weight, f"{type(self).__name__}.weight")
        check_weight_shape(self, weight.logical_shape)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._check_weight()
        check_input(self, x)
        compute_dtype = self.compute_dtype or x.dtype
        if x.dtype == torch.float16 and compute_dtype == torch.float32 and not torch.compiler.is_compiling():
            batch_one = x.numel() == x.shape[-1]
            _warn_once(_SLOW_COMPUTE_DTYPE.format("inference" if batch_one else "inference or training speed"))
        bias = self.bias
        A = x if x.dtype == compute_dtype else x.to(compute_dtype)
        out = call_op(
            torch.ops.lowbit.gemm_4bit.default, A, weight.packed, weight.absmax, weight.blocksize, weight.quant_type,
            list(weight.logical_shape), bias, *weight.nested_args(), grad_inputs=(x, bias),
        )  # fmt: skip
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _weight_state(self, weight: Params4bit) -> dict[str, torch.Tensor]:
        weight = self._check_weight(weight)
        stats = weight.quant_state.as_dict(packed=True)
        return {"weight": weight.packed, **{f"weight.{k}": v for k, v in stats.items()}}

    def _weight_entries(self, state_dict: dict, prefix: str) -> set[str]:
        key = prefix + "weight"
        return {key, *(k for k in state_dict if k.startswith(key + "."))}

    def _decode_weight(self, state_dict: dict, prefix: str, device: torch.device, current: Params4bit) -> Params4bit:
        """The checkpoint's weight: packed with its ``weight.*`` quant state, or a float weight to quantize."""
        key = prefix + "weight"
        current = self._check_weight(current)
        stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        if not stats:
            return current._quantized_like(state_dict[key].to(device))
        data = state_dict[key].to(device)
        if data.shape == current.shape:  # also a row shard under FSDP2: the copy checks its layout
            loaded = Params4bit(data, quant_state=F.QuantState.from_dict(qs_dict=stats, device=device))
        else:
            loaded = Params4bit.from_prequantized(data, stats, device=device)
        for what, have, got in (
            ("quant_type", current.quant_type, loaded.quant_type),
            ("shape", current.logical_shape, loaded.logical_shape),
            ("blocksize", current.blocksize, loaded.blocksize),
        ):
            if have != got:
                raise ValueError(f"checkpoint {what} {got!r} does not match the module's {have!r}")
        if _dtensor.local(self.weight) is self.weight:  # a row shard holds part of the codes: its copy checks them
            loaded.check_state(key)  # the checkpoint's inner tensors agree with each other (before any conversion)
        return loaded.with_quant_storage(current.quant_storage)


class LinearFP4(Linear4bit):
    """``Linear4bit`` with ``quant_type="fp4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None) -> None:  # fmt: skip
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device
        )


class LinearNF4(Linear4bit):
    """``Linear4bit`` with ``quant_type="nf4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None) -> None:  # fmt: skip
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device
        )
