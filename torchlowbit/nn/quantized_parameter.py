"""``QuantizedParameter``: the traceable wrapper-subclass protocol shared by the quantized weights.

A quantized weight is a set of plain inner tensors (codes, scales) plus hashable metadata. The outer
tensor takes the shape, dtype and device of the first inner tensor (the stored codes), so state dicts,
``torch.equal`` and module registration see what bitsandbytes users expect. Every inner tensor moves
with the weight, a dtype cast never touches the codes, and ``copy_`` of a float tensor quantizes it.

Sharding (FSDP2, DTensor): a weight splits along its outer rows, each piece taking the scales of its rows
(whole quantization blocks only; the second-level scales stay whole), and all-gathers its pieces as raw
bytes through ``fsdp_pre_all_gather``/``fsdp_post_all_gather``.
"""

import hashlib
import math
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

    @classmethod
    def checked(cls, weight: torch.Tensor, owner: str) -> "QuantizedParameter":
        """``weight``, which must be a ``cls``: else a ``TypeError`` naming ``owner`` (e.g. ``"Linear4bit.weight"``)
        and what it holds.

        While tracing (compile, export) the quant state is checked here too, so that an inconsistent one is reported
        under ``owner``'s name instead of as a failed fake-tensor call of an op; in eager the ops check it.
        """
        if not isinstance(weight, cls):
            kind = ("an " if cls.__name__[0] in "AEIOU" else "a ") + cls.__name__
            raise TypeError(
                f"{owner} must be {kind} (a quantized weight), got an unquantized {weight.dtype} tensor of shape "
                f"{list(weight.shape)}: assign {kind} or load a quantized state dict"
            )
        if torch.compiler.is_compiling():
            weight.check_state(owner)
        return weight

    def check_state(self, owner: str) -> None:
        """Raise a clear error, naming ``owner`` (e.g. ``"Linear4bit.weight"``), where the inner tensors disagree
        with each other or with the meta."""
        raise NotImplementedError

    def _rows_per_entry(self) -> dict[str, int]:
        """For each inner tensor cut along with the outer rows: how many outer rows one of its entries spans.

        Inner tensors not named here (code tables, second-level scales) are whole on every shard.
        """
        raise NotImplementedError

    def _slice_rows(self, start: int, end: int) -> "QuantizedParameter":
        """Outer rows ``[start, end)`` and the scales that belong to them; cuts must fall between blocks."""
        rows = self.shape[0]
        end = min(end, rows)
        inner = dict(self.inner())
        for name, per_entry in self._rows_per_entry().items():
            if start % per_entry or (end % per_entry and end != rows):
                raise ValueError(
                    f"cannot cut {self!r} at rows {start}:{end}: cuts must fall between quantization blocks, "
                    f"every {per_entry} rows"
                )
            inner[name] = inner[name][start // per_entry : -(-end // per_entry)]
        return self._make(inner, self.meta)

    def _new_zeros(self, rows: int, device: torch.device) -> "QuantizedParameter":
        per_entry = self._rows_per_entry()
        inner = {}
        for name, t in self.inner().items():
            if t is not None:
                shape = t.shape if name not in per_entry else (-(-rows // per_entry[name]), *t.shape[1:])
                inner[name] = torch.zeros(shape, dtype=t.dtype, device=device)
        return self._make(inner, self.meta)

    # --- FSDP2 all-gather extension: shards travel as raw bytes, never reinterpreted as floats --------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The row-cut inner tensors as bytes to all-gather; the whole ones ride along in the metadata."""
        _check_even_shards(self, outer_size[0], mesh.size())
        names = tuple(self._rows_per_entry())
        inputs = tuple(getattr(self, name).view(torch.uint8) for name in names)
        shapes = tuple(t.shape for t in inputs)
        if mesh.size() == 1:  # FSDP2 copies a single input when there is nothing to gather
            inputs = (torch.cat([t.reshape(-1) for t in inputs]),)
        whole = {name: t for name, t in self.inner().items() if name not in names}
        return inputs, (names, tuple(getattr(self, name).dtype for name in names), shapes, whole, self.meta)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The unsharded weight over the all-gathered bytes (``param_dtype`` never converts codes)."""
        names, dtypes, shapes, whole, meta = metadata
        if len(all_gather_outputs) < len(names):  # the single input of a 1-rank mesh
            pieces = all_gather_outputs[0].view(-1).split([math.prod(shape) for shape in shapes])
            all_gather_outputs = [t.view(shape) for t, shape in zip(pieces, shapes, strict=True)]
        gathered = {name: t.view(dtype) for name, t, dtype in zip(names, all_gather_outputs, dtypes, strict=True)}
        if out is not None:
            for name, t in gathered.items():
                if getattr(out, name).data_ptr() != t.data_ptr():
                    getattr(out, name).copy_(t)
            return None
        return self._make({**whole, **gathered}, meta), ()

    # --- the subclass protocol -------------------------------------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], Hashable]:
        return [name for name in self.inner_names if getattr(self, name) is not None], self.meta

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, meta: Hashable, outer_size, outer_stride) -> "QuantizedParameter":
        return cls._make(inner, meta)

    def _stable_hash_for_caching(self) -> str:
        """The same in every process for the same layout: type, metadata, inner tensors' shapes (not data).

        torch.compile's AOT autograd cache keys graphs by it (Python's ``hash`` changes between processes).
        """
        parts = [type(self).__qualname__, repr(self.meta)]
        for name, t in self.inner().items():
            if t is not None:
                parts.append(f"{name}:{tuple(t.shape)}:{t.stride()}:{t.dtype}:{t.device.type}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

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


def _check_even_shards(weight: QuantizedParameter, rows: int, world_size: int) -> None:
    """FSDP2 all-gathers several tensors per weight, which needs every rank to hold the same whole blocks."""
    per_entry = max(weight._rows_per_entry().values())
    if rows % world_size == 0 and (rows // world_size % per_entry == 0 or world_size == 1):
        return
    accepted = [n for n in range(1, 65) if rows % n == 0 and (rows // n % per_entry == 0 or n == 1)]
    raise ValueError(
        f"cannot shard {weight!r} over {world_size} ranks: each rank must hold the same number of its {rows} rows, "
        f"a multiple of {per_entry} (whole quantization blocks); world sizes that work: {accepted}"
    )


def _split(weight: QuantizedParameter, split_size: int, dim: int = 0) -> list[QuantizedParameter]:
    if dim != 0:
        raise ValueError(f"{type(weight).__name__} can only be split along dim 0 (its rows), got dim={dim}")
    rows = weight.shape[0]
    _check_even_shards(weight, rows, -(-rows // split_size))
    return [weight._slice_rows(start, start + split_size) for start in range(0, rows, split_size)]


def _slice(weight: QuantizedParameter, dim: int = 0, start=None, end=None, step: int = 1) -> QuantizedParameter:
    if dim != 0 or step != 1:
        raise ValueError(f"{type(weight).__name__} can only be sliced along dim 0 with step 1")
    rows = weight.shape[0]
    start, end = (start or 0), (rows if end is None else end)
    return weight._slice_rows(start + rows if start < 0 else start, end + rows if end < 0 else end)


def _new_zeros(weight: QuantizedParameter, size, *, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype not in (None, weight.dtype):
        raise ValueError(f"new_zeros of {weight!r} makes a zero weight of its own dtype, not {dtype}")
    if tuple(size[1:]) != tuple(weight.shape[1:]):
        raise ValueError(f"new_zeros of {weight!r} must keep the trailing sizes {list(weight.shape[1:])}, got {size}")
    return weight._new_zeros(size[0], device or weight.device)


def _view(weight: QuantizedParameter, size) -> QuantizedParameter:
    """A reshaped handle on the codes (FSDP keeps ``view(-1)`` of its shards); the scales stay as they are."""
    first = weight.inner_names[0]
    return weight._make({**weight.inner(), first: getattr(weight, first).view(size)}, weight.meta)


def _as_strided(weight: QuantizedParameter, size, stride, storage_offset=0) -> QuantizedParameter:
    if tuple(size) != tuple(weight.shape) or tuple(stride) != weight.stride() or storage_offset:
        raise ValueError(f"{type(weight).__name__} supports as_strided only as an alias of itself")
    return weight._map_inner(lambda t: t)


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
    shapes = {name: (t.shape, getattr(source, name).shape) for name, t in dest.inner().items() if t is not None}
    if any(a != b for a, b in shapes.values()):
        raise ValueError(f"cannot copy {src!r} into {dest!r}: their tensors' shapes differ: {shapes}")
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
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
}

torch.serialization.add_safe_globals([_rebuild])
