"""``lowbit::optimizer_update_32bit`` / ``lowbit::optimizer_update_8bit_blockwise``: one in-place optimizer step.

Both ops share ``_step``: the float32 update of bitsandbytes' optimizer kernels. The 32-bit op keeps float32
states; the 8-bit op decodes its uint8 states (blocks of 256, float32 absmax per block), steps, and requantizes
them with a fresh absmax. ``lr`` and ``step`` are 0-d tensors (possibly on the CPU while ``p`` is on CUDA) and are
only used in tensor math, so a step never reads a device value on the host.

The ``*_grouped`` ops take lists (one entry per parameter, a step count each, one lr and one pair of maps) and
apply the single-tensor update to each entry; on CUDA one launch covers many tensors.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import blockwise
from .checks import check_code, check_dtype, check_numel, check_same_device
from .quantize_blockwise import decode
from .registry import register_fake, register_reference

BLOCKSIZE = 256  # 8-bit optimizer states are always quantized in blocks of 256
LR_DTYPES = (torch.float32, torch.float64)
STEP_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


@dataclass(frozen=True)
class Hyper:
    """The scalar arguments of one step, in schema order."""

    beta1: float
    beta2: float
    beta3: float
    alpha: float
    eps: float
    weight_decay: float
    gnorm_scale: float = 1.0
    max_unorm: float = 0.0
    skip_zeros: bool = False


# A rule maps (g, state1, state2, step as float32, hyper) to (update direction u before lr, new state1, new state2).
Rule = Callable[[Tensor, Tensor, Tensor | None, Tensor, Hyper], tuple[Tensor, Tensor, Tensor | None]]


def _adam(g: Tensor, m: Tensor, v: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, Tensor]:
    """Adam: bias-corrected first moment over the square root of the bias-corrected second moment."""
    m = h.beta1 * m + (1 - h.beta1) * g
    v = h.beta2 * v + (1 - h.beta2) * g * g
    c1, c2 = 1 - h.beta1**t, (1 - h.beta2**t).sqrt()
    return (c2 / c1) * m / (v.sqrt() + h.eps * c2), m, v


def _ademamix(g: Tensor, m: Tensor, nu: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, Tensor]:
    """AdEMAMix: a fast (beta1, bias-corrected) and a slow (beta3, scaled by alpha) EMA over Adam's denominator."""
    fast = h.beta1 * m[0] + (1 - h.beta1) * g
    slow = h.beta3 * m[1] + (1 - h.beta3) * g
    nu = h.beta2 * nu + (1 - h.beta2) * g * g
    c1, c2 = 1 - h.beta1**t, (1 - h.beta2**t).sqrt()
    return (fast / c1 + h.alpha * slow) / (nu.sqrt() / c2 + h.eps), torch.stack((fast, slow)), nu


def _lion(g: Tensor, m: Tensor, _: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, None]:
    """Lion: the sign of a beta1 interpolation; the momentum itself moves with beta2."""
    return torch.sign(h.beta1 * m + (1 - h.beta1) * g), h.beta2 * m + (1 - h.beta2) * g, None


def _momentum(g: Tensor, m: Tensor, _: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, None]:
    """Heavy-ball momentum without dampening; the first step takes the gradient as the buffer."""
    # a factor rather than torch.where: a where on a CPU condition would copy it to the device and synchronize
    m = (h.beta1 * (t != 1)) * m + g
    return m, m, None


def _rmsprop(g: Tensor, s: Tensor, _: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, None]:
    """RMSprop (alpha = beta1), eps outside the square root."""
    s = h.beta1 * s + (1 - h.beta1) * g * g
    return g / (s.sqrt() + h.eps), s, None


def _adagrad(g: Tensor, s: Tensor, _: Tensor | None, t: Tensor, h: Hyper) -> tuple[Tensor, Tensor, None]:
    """Adagrad: the sum of squared gradients, eps outside the square root."""
    s = s + g * g
    return g / (s.sqrt() + h.eps), s, None


@dataclass(frozen=True)
class Optimizer:
    """How one optimizer name steps: its rule, its state layout and its kind of weight decay."""

    rule: Rule
    state1_rows: int  # state1 is (state1_rows, *p.shape) when > 1
    has_state2: bool
    decoupled_decay: bool  # p *= 1 - lr * weight_decay, else weight_decay * p is added to the gradient


OPTIMIZERS = {
    "adam": Optimizer(_adam, 1, True, True),
    "lamb": Optimizer(_adam, 1, True, True),  # LAMB is Adam with max_unorm (the trust ratio)
    "ademamix": Optimizer(_ademamix, 2, True, True),
    "lion": Optimizer(_lion, 1, False, True),
    "momentum": Optimizer(_momentum, 1, False, False),
    "lars": Optimizer(_momentum, 1, False, False),  # LARS is momentum with max_unorm (the trust ratio)
    "rmsprop": Optimizer(_rmsprop, 1, False, False),
    "adagrad": Optimizer(_adagrad, 1, False, False),
}


def _step(
    opt: Optimizer, p: Tensor, g: Tensor, s1: Tensor, s2: Tensor | None, lr: Tensor, step: Tensor, h: Hyper
) -> tuple[Tensor, Tensor, Tensor | None]:
    """New float32 (p, state1, state2) after one step; p and g may be 16-bit, the states are float32."""
    p, g = p.float(), g.float() * h.gnorm_scale
    keep = g != 0 if h.skip_zeros else None
    if h.weight_decay and not opt.decoupled_decay:
        g = g + h.weight_decay * p
    u, new1, new2 = opt.rule(g, s1, s2, step.float(), h)
    if keep is not None:
        u = torch.where(keep, u, 0)  # skipped entries count for nothing in the update norm
    if h.max_unorm > 0:
        unorm, limit = torch.linalg.vector_norm(u), h.max_unorm * torch.linalg.vector_norm(p)
        u = u * torch.where(unorm > limit, limit / unorm, torch.ones_like(unorm))
    # decoupled decay before the update, as torch's AdamW and bitsandbytes' Python backends (its CUDA kernels differ
    # by O(lr^2 * weight_decay) and apply it after the update for Adam and AdEMAMix)
    decay = 1 - lr * h.weight_decay if h.weight_decay and opt.decoupled_decay else 1
    new_p = p * decay - lr * u
    if keep is not None:
        new_p, new1 = torch.where(keep, new_p, p), torch.where(keep, new1, s1)
        new2 = None if s2 is None else torch.where(keep, new2, s2)
    return new_p, new1, new2


def _optimizer(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer_name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def _check_shape(t: Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_scalar(t: Tensor, name: str, allowed: tuple[torch.dtype, ...], device: torch.device) -> None:
    check_dtype(t, name, allowed)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(t.shape)}")
    if t.device not in (device, torch.device("cpu")):
        raise ValueError(f"{name} must be on the CPU or on p's device {device}, got {t.device}")


def _check(name: str, p: Tensor, g: Tensor, state1: Tensor, state2: Tensor | None, lr: Tensor, step: Tensor,
           state_dtype: torch.dtype) -> Optimizer:  # fmt: skip
    """Shared checks of both ops; returns the optimizer's rule table entry."""
    opt = _optimizer(name)
    check_dtype(p, "p")
    check_dtype(g, "g", (p.dtype,))
    check_dtype(state1, "state1", (state_dtype,))
    _check_shape(g, "g", tuple(p.shape))
    _check_shape(state1, "state1", (opt.state1_rows, *p.shape) if opt.state1_rows > 1 else tuple(p.shape))
    if opt.has_state2 != (state2 is not None):
        needs = "needs a state2 tensor" if opt.has_state2 else "has one state: state2 must be None"
        raise ValueError(f"optimizer {name!r} {needs}")
    if state2 is not None:
        check_dtype(state2, "state2", (state_dtype,))
        _check_shape(state2, "state2", tuple(p.shape))
    check_same_device(p=p, g=g, state1=state1, state2=state2)
    _check_scalar(lr, "lr", LR_DTYPES, p.device)
    _check_scalar(step, "step", STEP_DTYPES, p.device)
    return opt


def _check_8bit(name: str, p: Tensor, g: Tensor, state1: Tensor, state2: Tensor | None, absmax1: Tensor,
                absmax2: Tensor | None, qmap1: Tensor, qmap2: Tensor | None, lr: Tensor,
                step: Tensor) -> Optimizer:  # fmt: skip
    """The 8-bit op's checks: ``_check``, one float32 absmax per block of 256 and a 256-entry map per state."""
    opt = _check(name, p, g, state1, state2, lr, step, torch.uint8)
    blocks = blockwise.num_blocks(p.numel(), BLOCKSIZE)
    check_dtype(absmax1, "absmax1", (torch.float32,))
    check_numel(absmax1, "absmax1", opt.state1_rows * blocks, f"{opt.state1_rows} x {blocks} blocks of {BLOCKSIZE}")
    check_code(qmap1, "qmap1")
    for name, t in (("absmax2", absmax2), ("qmap2", qmap2)):
        if (t is None) != (state2 is None):
            raise ValueError(f"{name} must be given exactly when state2 is (optimizer with two states)")
    if absmax2 is not None:
        check_dtype(absmax2, "absmax2", (torch.float32,))
        check_numel(absmax2, "absmax2", blocks, f"one per block of {BLOCKSIZE}")
        check_code(qmap2, "qmap2")
    check_same_device(p=p, absmax1=absmax1, absmax2=absmax2, qmap1=qmap1, qmap2=qmap2)
    return opt


def _check_lists(name: str, p: list[Tensor], **lists: list[Tensor]) -> Optimizer:
    """The grouped ops' list checks: one entry per parameter (none of an absent second state); p of one dtype and
    one device."""
    opt = _optimizer(name)
    for arg, tensors in lists.items():
        if arg in ("state2", "absmax2") and not opt.has_state2:
            if tensors:
                raise ValueError(f"optimizer {name!r} has one state: {arg} must be empty, got {len(tensors)} tensors")
        elif len(tensors) != len(p):
            raise ValueError(f"{arg} must hold one tensor per parameter ({len(p)}), got {len(tensors)}")
    for index, t in enumerate(p[1:], start=1):
        if t.dtype != p[0].dtype:
            raise TypeError(f"p[{index}] must have the dtype of p[0] ({p[0].dtype}), got {t.dtype}")
        if t.device != p[0].device:
            raise ValueError(f"all tensors must be on one device, got p[0] on {p[0].device}, p[{index}] on {t.device}")
    return opt


def _entries(check: Callable[..., object], p: list[Tensor], *lists: list[Tensor]) -> list[tuple]:
    """The grouped ops' per-parameter argument tuples (``None`` for an empty list), each passed through ``check``;
    an error names the entry."""
    entries = list(zip(p, *(t if t else [None] * len(p) for t in lists), strict=True))
    for index, entry in enumerate(entries):
        try:
            check(*entry)
        except (TypeError, ValueError) as error:
            raise type(error)(f"entry {index} of the lists: {error}") from None
    return entries


def _dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor, rows: int) -> Tensor:
    """Float32 values of ``codes``; each of its ``rows`` is quantized in blocks of its own."""
    pairs = zip(codes.reshape(rows, -1), absmax.reshape(rows, -1), strict=True)
    return torch.stack([decode(c, a, qmap, BLOCKSIZE) for c, a in pairs]).view(codes.shape)


def _requantize(values: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor, rows: int, keep_sign: bool) -> None:
    """Write the nearest codes of ``values`` (fresh absmax per block) into ``codes`` and ``absmax``."""
    per_row = values.reshape(rows, -1)
    normalized, new_absmax = blockwise.normalize(torch.cat([blockwise.blocks(r, BLOCKSIZE) for r in per_row]))
    index = blockwise.nearest(normalized, qmap).view(rows, -1)[:, : per_row.shape[1]]
    if keep_sign:
        # As bitsandbytes: a state never flips sign (a tiny negative moment does not become +0); the map is sorted.
        flipped = torch.signbit(qmap[index]) != torch.signbit(per_row)
        index = torch.where(flipped, index + torch.where(per_row > 0, 1, -1), index).clamp(0, qmap.numel() - 1)
    codes.copy_(index.view(codes.shape))
    absmax.copy_(new_absmax.view(absmax.shape))


def _update_32bit(opt: Optimizer, p: Tensor, g: Tensor, state1: Tensor, state2: Tensor | None, lr: Tensor,
                  step: Tensor, h: Hyper) -> None:  # fmt: skip
    new_p, new1, new2 = _step(opt, p, g, state1, state2, lr, step, h)
    p.copy_(new_p)
    state1.copy_(new1)
    if state2 is not None:
        state2.copy_(new2)


def _update_8bit(opt: Optimizer, p: Tensor, g: Tensor, state1: Tensor, state2: Tensor | None, absmax1: Tensor,
                 absmax2: Tensor | None, qmap1: Tensor, qmap2: Tensor | None, lr: Tensor, step: Tensor,
                 h: Hyper) -> None:  # fmt: skip
    rows = opt.state1_rows
    s1 = _dequantize(state1, absmax1, qmap1, rows)
    s2 = None if state2 is None else _dequantize(state2, absmax2, qmap2, 1)
    new_p, new1, new2 = _step(opt, p, g, s1, s2, lr, step, h)
    p.copy_(new_p)
    _requantize(new1, state1, absmax1, qmap1, rows, keep_sign=True)
    if state2 is not None:
        _requantize(new2, state2, absmax2, qmap2, 1, keep_sign=False)


def _entries_32bit(name, p, g, state1, state2, lr, step) -> tuple[Optimizer, list[tuple]]:
    opt = _check_lists(name, p, g=g, state1=state1, state2=state2, step=step)

    def check(p, g, state1, state2, step):
        _check(name, p, g, state1, state2, lr, step, torch.float32)

    return opt, _entries(check, p, g, state1, state2, step)


def _entries_8bit(name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step) -> tuple[Optimizer, list]:
    opt = _check_lists(name, p, g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2, step=step)

    def check(p, g, state1, state2, absmax1, absmax2, step):
        _check_8bit(name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step)

    return opt, _entries(check, p, g, state1, state2, absmax1, absmax2, step)


# ``hyper``: (beta1, ..., skip_zeros) as given, Hyper's fields in schema order (its defaults are the schema's).
@register_fake("optimizer_update_32bit")
def _(optimizer_name, p, g, state1, state2, lr, step, *hyper):
    _check(optimizer_name, p, g, state1, state2, lr, step, torch.float32)


@register_reference("optimizer_update_32bit")
def _(optimizer_name, p, g, state1, state2, lr, step, *hyper):
    opt = _check(optimizer_name, p, g, state1, state2, lr, step, torch.float32)
    _update_32bit(opt, p, g, state1, state2, lr, step, Hyper(*hyper))


@register_fake("optimizer_update_8bit_blockwise")
def _(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step, *hyper):
    _check_8bit(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step)


@register_reference("optimizer_update_8bit_blockwise")
def _(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step, *hyper):
    opt = _check_8bit(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step)
    _update_8bit(opt, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step, Hyper(*hyper))


@register_fake("optimizer_update_32bit_grouped")
def _(optimizer_name, p, g, state1, state2, lr, step, *hyper):
    _entries_32bit(optimizer_name, p, g, state1, state2, lr, step)


@register_reference("optimizer_update_32bit_grouped")
def _(optimizer_name, p, g, state1, state2, lr, step, *hyper):
    opt, entries = _entries_32bit(optimizer_name, p, g, state1, state2, lr, step)
    h = Hyper(*hyper)
    for p_i, g_i, state1_i, state2_i, step_i in entries:
        _update_32bit(opt, p_i, g_i, state1_i, state2_i, lr, step_i, h)


@register_fake("optimizer_update_8bit_blockwise_grouped")
def _(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step, *hyper):
    _entries_8bit(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step)


@register_reference("optimizer_update_8bit_blockwise_grouped")
def _(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step, *hyper):
    opt, entries = _entries_8bit(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step)
    h = Hyper(*hyper)
    for p_i, g_i, state1_i, state2_i, absmax1_i, absmax2_i, step_i in entries:
        _update_8bit(opt, p_i, g_i, state1_i, state2_i, absmax1_i, absmax2_i, qmap1, qmap2, lr, step_i, h)
