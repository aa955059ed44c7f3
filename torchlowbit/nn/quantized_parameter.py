"""``QuantizedParameter``: the traceable wrapper-subclass protocol shared by the quantized weights.

A quantized weight is a set of plain inner tensors (codes, scales) plus hashable metadata. The outer
tensor takes the shape, dtype and device of the first inner tensor (the stored codes), so state dicts,
``torch.equal`` and module registration see what bitsandbytes users expect. Every inner tensor moves
with the weight, a dtype cast never touches the codes, and ``copy_`` of a float tensor quantizes it.
"""

from collections.abc import Callable, Hashable
from typing import ClassVar

import torch

aten = torch.ops.aten


class QuantizedParameter(torch.Tensor):
    """Base of ``Params4bit`` and ``Int8Params``; subclasses name their inner tensors and quantize."""

    inner_names: ClassVar[tuple[str, ...]]  # the first one defines the outer shape and dtype
    meta: Hashable

    @classmethod
    def _make(cls, inner: dict[str, torch.Tensor | None], meta: Hashable) -> "QuantizedParameter":
        codes = inner[cls.inner_names[0]]
        self = torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, strides=codes.stride(), dtype=codes.dtype, device=codes.device, requires_grad=False
        )
        for name in cls.inner_names:
            setattr(self, name, inner.get(name))
        self.meta = meta
        self._is_param = True  # registers as an nn.Parameter, as the bitsandbytes classes are Parameters
        return self

    def inner(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in self.inner_names}

    def _map_inner(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedParameter":
        return self._make({k: None if t is None else fn(t) for k, t in self.inner().items()}, self.meta)

    def _quantized_like(self, src: torch.Tensor) -> "QuantizedParameter":
        """``src`` (a float tensor of the represented shape) quantized with this weight's settings."""
        raise NotImplementedError

    def _layout(self) -> tuple:
        """What must agree for one weight's tensors to be copied into another's in place."""
        raise NotImplementedError

    # --- the subclass protocol -------------------------------------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], Hashable]:
        return [name for name, t in self.inner().items() if t is not None], self.meta

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, meta: Hashable, outer_size, outer_stride) -> "QuantizedParameter":
        return cls._make(inner, meta)

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self), self.inner(), self.meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"{cls.__name__} does not support {func}; use weight.dequantize() for a float tensor"
            )
        return handler(*args, **(kwargs or {}))

    __torch_function__ = torch._C._disabled_torch_function_impl


def _rebuild(cls: type, inner: dict, meta: Hashable) -> QuantizedParameter:
    return cls._make(inner, meta)


def _to_copy(weight: QuantizedParameter, *, dtype=None, device=None, non_blocking=False, **_) -> QuantizedParameter:
    # The dtype is ignored on purpose: .half()/.float() must never convert or reinterpret stored codes.
    return weight._map_inner(lambda t: t.to(device=device, non_blocking=non_blocking))


def _copy_(dest: QuantizedParameter, src: torch.Tensor, non_blocking: bool = False) -> QuantizedParameter:
    """Copy another quantized weight's tensors, or quantize a float tensor of the represented shape, in place.

    Only inner tensors change: aliases (``detach()``, ``.data``) share them, so all of them see the copy.
    """
    if isinstance(src, QuantizedParameter):
        if type(src) is not type(dest) or src._layout() != dest._layout():
            raise ValueError(f"cannot copy {src!r} into {dest!r}: their quantization layouts differ")
        source = src
    else:
        source = dest._quantized_like(src)
    for name, t in dest.inner().items():
        if t is not None:
            t.copy_(getattr(source, name), non_blocking=non_blocking)
    return dest


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if type(a) is not type(b) or a.meta != b.meta:
        return False
    pairs = zip(a.inner().values(), b.inner().values(), strict=True)
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


_HANDLERS = {
    aten.detach.default: lambda w: w._map_inner(torch.Tensor.detach),
    aten.alias.default: lambda w: w._map_inner(lambda t: t),
    aten.clone.default: lambda w, memory_format=None: w._map_inner(torch.Tensor.clone),
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.equal.default: _equal,
    aten.empty_like.default: lambda w, *, device=None, **_: w._map_inner(lambda t: torch.empty_like(t, device=device)),
    aten.is_pinned.default: lambda w, device=None: all(t.is_pinned() for t in w.inner().values() if t is not None),
    aten._pin_memory.default: lambda w, device=None: w._map_inner(torch.Tensor.pin_memory),
}

torch.serialization.add_safe_globals([_rebuild])
