"""lowbit::optimizer_update_32bit / optimizer_update_8bit_blockwise: in-place optimizer steps."""

import pytest
import torch

from torchlowbit.codebooks import create_dynamic_map
from torchlowbit.ops.optimizer_update import OPTIMIZERS

NAMES = sorted(OPTIMIZERS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HYPER = {"beta1": 0.9, "beta2": 0.99, "beta3": 0.999, "alpha": 5.0, "eps": 1e-8}
SHAPE = (25, 40)  # 1000 elements: four blocks of 256, the last one partial


def _args(**overrides) -> tuple:
    """(beta1, beta2, beta3, alpha, eps, weight_decay) in schema order."""
    h = {**HYPER, "weight_decay": 0.0, **overrides}
    return h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["weight_decay"]


def _scalars(lr: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # On the CPU whatever p's device: the ops accept 0-d CPU lr/step with CUDA tensors.
    return torch.tensor(lr, dtype=torch.float32), torch.tensor(step)


def _zero_states(name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = OPTIMIZERS[name].state1_rows
    state1 = torch.zeros((rows, *p.shape) if rows > 1 else p.shape, device=p.device)
    return state1, torch.zeros(p.shape, device=p.device) if OPTIMIZERS[name].has_state2 else None


def step32(name, p, g, state1, state2, lr, step, gnorm_scale=1.0, max_unorm=0.0, skip_zeros=False, **hyper):
    lr, step = _scalars(lr, step)
    torch.ops.lowbit.optimizer_update_32bit(
        name, p, g, state1, state2, lr, step, *_args(**hyper), gnorm_scale, max_unorm, skip_zeros
    )


class State8bit:
    """Zero 8-bit states of a parameter, laid out as the optimizers keep them."""

    def __init__(self, name: str, p: torch.Tensor):
        rows, blocks = OPTIMIZERS[name].state1_rows, -(-p.numel() // 256)
        self.blocks = blocks
        two = OPTIMIZERS[name].has_state2
        self.state1 = torch.full((rows, *p.shape) if rows > 1 else p.shape, 127, dtype=torch.uint8, device=p.device)
        self.absmax1 = torch.zeros((rows, blocks) if rows > 1 else (blocks,), device=p.device)
        self.qmap1 = create_dynamic_map(signed=True).to(p.device)
        self.state2 = torch.zeros(p.shape, dtype=torch.uint8, device=p.device) if two else None
        self.absmax2 = torch.zeros(blocks, device=p.device) if two else None
        self.qmap2 = create_dynamic_map(signed=False).to(p.device) if two else None

    def tensors(self) -> tuple:
        return self.state1, self.state2, self.absmax1, self.absmax2, self.qmap1, self.qmap2

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 states (each row of AdEMAMix's state1 quantized in its own blocks)."""

        def decode(codes, absmax, qmap):
            rows = absmax.reshape(-1, self.blocks).shape[0]
            values = qmap[codes.long()].reshape(rows, -1)
            scale = absmax.reshape(rows, -1).repeat_interleave(256, dim=1)[:, : values.shape[1]]
            return (values * scale).view(codes.shape)

        s2 = None if self.state2 is None else decode(self.state2, self.absmax2, self.qmap2)
        return decode(self.state1, self.absmax1, self.qmap1), s2


def step8(name, p, g, st: State8bit, lr, step, gnorm_scale=1.0, max_unorm=0.0, skip_zeros=False, **hyper):
    lr, step = _scalars(lr, step)
    torch.ops.lowbit.optimizer_update_8bit_blockwise(
        name, p, g, *st.tensors(), lr, step, *_args(**hyper), gnorm_scale, max_unorm, skip_zeros
    )


def _random_32bit_states(name, p):
    state1, state2 = _zero_states(name, p)
    if name in ("rmsprop", "adagrad"):  # sums of squares are positive
        state1.uniform_(0.1, 1.0)
    else:
        state1.normal_()
    if state2 is not None:
        state2.uniform_(0.1, 1.0)
    return state1, state2


def _gradient_with_zeros(p: torch.Tensor) -> torch.Tensor:
    g = torch.randn(p.shape[::-1], device=p.device).t()
    g[:, ::7] = 0
    return g.to(p.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_32bit(device, name, dtype):
    p = torch.randn(SHAPE, device=device, dtype=dtype)
    g = _gradient_with_zeros(p)
    assert not g.is_contiguous()
    state1, state2 = _random_32bit_states(name, p)
    lr, step = _scalars(1e-2, 3)
    args = (name, p, g, state1, state2, lr, step, *_args(weight_decay=0.01), 0.5, 0.5, True)
    torch.library.opcheck(torch.ops.lowbit.optimizer_update_32bit, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_8bit_blockwise(device, name, dtype):
    p = torch.randn(SHAPE, device=device, dtype=dtype)
    g = _gradient_with_zeros(p)
    st = State8bit(name, p)
    st.state1.random_(0, 256)
    st.absmax1.uniform_(0.1, 1.0)
    if st.state2 is not None:
        st.state2.random_(0, 256)
        st.absmax2.uniform_(0.1, 1.0)
    lr, step = _scalars(1e-2, 3)
    args = (name, p, g, *st.tensors(), lr, step, *_args(weight_decay=0.01), 0.5, 0.5, True)
    torch.library.opcheck(torch.ops.lowbit.optimizer_update_8bit_blockwise, args)


def _run_ours(name, p0, grads, lr, **hyper):
    p = p0.clone()
    state1, state2 = _zero_states(name, p)
    for t, g in enumerate(grads, start=1):
        step32(name, p, g, state1, state2, lr, t, **hyper)
    return p


def _run_torch(optimizer_cls, p0, grads, **kwargs):
    p = p0.clone().requires_grad_()
    optimizer = optimizer_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach()


TORCH_EQUIVALENTS = {
    # name: (our hyperparameters, torch optimizer, its arguments)
    "adam": (dict(beta1=0.9, beta2=0.99, eps=1e-8), torch.optim.Adam, dict(betas=(0.9, 0.99), eps=1e-8)),
    "adamw": (
        dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
        torch.optim.AdamW,
        dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    ),
    "momentum": (
        dict(beta1=0.9, weight_decay=0.01),
        torch.optim.SGD,
        dict(momentum=0.9, dampening=0, weight_decay=0.01),
    ),
    "rmsprop": (
        dict(beta1=0.95, eps=1e-8, weight_decay=0.01),
        torch.optim.RMSprop,
        dict(alpha=0.95, eps=1e-8, weight_decay=0.01),
    ),
    # torch's Adagrad divides by sqrt(sum) + eps, as bitsandbytes does (no difference in eps placement).
    "adagrad": (
        dict(eps=1e-10, weight_decay=0.01),
        torch.optim.Adagrad,
        dict(eps=1e-10, weight_decay=0.01, lr_decay=0, initial_accumulator_value=0),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_EQUIVALENTS))
def test_32bit_matches_torch_optim(device, case):
    hyper, optimizer_cls, kwargs = TORCH_EQUIVALENTS[case]
    name = "adam" if case == "adamw" else case
    torch.manual_seed(0)
    p0 = torch.randn(1000, device=device)
    grads = [torch.randn(1000, device=device) for _ in range(25)]
    ours = _run_ours(name, p0, grads, 1e-2, **hyper)
    reference = _run_torch(optimizer_cls, p0, grads, lr=1e-2, **kwargs)
    assert not torch.equal(ours, p0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def _lion_float64(p, grads, lr, beta1, beta2, weight_decay):
    """The published Lion rule (Chen et al., 2023), in float64."""
    p, m = p.double(), torch.zeros_like(p, dtype=torch.float64)
    for g in grads:
        g = g.double()
        p = p - lr * (torch.sign(beta1 * m + (1 - beta1) * g) + weight_decay * p)
        m = beta2 * m + (1 - beta2) * g
    return p


def _ademamix_float64(p, grads, lr, beta1, beta2, beta3, alpha, eps, weight_decay):
    """The published AdEMAMix rule (Pagliardini et al., 2024), in float64."""
    p = p.double()
    m1, m2, nu = (torch.zeros_like(p) for _ in range(3))
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta3 * m2 + (1 - beta3) * g
        nu = beta2 * nu + (1 - beta2) * g * g
        m1_hat, nu_hat = m1 / (1 - beta1**t), nu / (1 - beta2**t)
        p = p - lr * ((m1_hat + alpha * m2) / (nu_hat.sqrt() + eps) + weight_decay * p)
    return p


def test_lion_matches_published_rule(device):
    torch.manual_seed(1)
    p0 = torch.randn(1000, device=device)
    grads = [torch.randn(1000, device=device) for _ in range(25)]
    ours = _run_ours("lion", p0, grads, 1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    reference = _lion_float64(p0, grads, 1e-3, 0.9, 0.99, 0.1)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)


def test_ademamix_matches_published_rule(device):
    torch.manual_seed(2)
    p0 = torch.randn(1000, device=device)
    grads = [torch.randn(1000, device=device) for _ in range(25)]
    hyper = dict(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-8, weight_decay=0.01)
    ours = _run_ours("ademamix", p0, grads, 1e-3, **hyper)
    reference = _ademamix_float64(p0, grads, 1e-3, **hyper)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)


def test_16bit_parameters_step_in_float32(device):
    p = torch.randn(1000, device=device, dtype=torch.bfloat16)
    g = torch.randn(1000, device=device, dtype=torch.bfloat16)
    expected = p.float().clone()
    state1, state2 = _zero_states("adam", expected)
    step32("adam", expected, g.float(), state1, state2, 1e-2, 1)
    state1, state2 = _zero_states("adam", p)
    step32("adam", p, g, state1, state2, 1e-2, 1)
    assert torch.equal(p, expected.bfloat16())


@pytest.mark.parametrize("name", NAMES)
def test_8bit_step_is_the_32bit_step_on_decoded_states(device, name):
    torch.manual_seed(3)
    p = torch.randn(SHAPE, device=device)
    st = State8bit(name, p)
    for t in (1, 2):  # the second step starts from nonzero 8-bit states
        g = torch.randn(SHAPE, device=device)
        state1, state2 = (s.clone() if s is not None else None for s in st.decoded())
        expected = p.clone()
        step32(name, expected, g, state1, state2, 1e-2, t, weight_decay=0.01)
        step8(name, p, g, st, 1e-2, t, weight_decay=0.01)
        assert torch.equal(p, expected)
    # each state is the blockwise 8-bit quantization of the float32 state (per row for AdEMAMix's two moments)
    pairs = [(state1, st.state1, st.absmax1, st.qmap1), (state2, st.state2, st.absmax2, st.qmap2)]
    for values, codes, absmax, qmap in pairs:
        if values is None:
            continue
        assert codes.dtype == torch.uint8 and codes.shape == values.shape and absmax.dtype == torch.float32
        rows = absmax.reshape(-1, st.blocks).shape[0]
        per_row = (t.reshape(rows, -1) for t in (values, codes, absmax))
        for row_values, row_codes, row_absmax in zip(*per_row, strict=True):
            ref_codes, ref_absmax = torch.ops.lowbit.quantize_blockwise(row_values, qmap, 256)
            assert torch.equal(row_absmax, ref_absmax)
            # the sign fix moves a negative value that rounds to +0 onto the smallest negative code
            sign_fixed = (row_values < 0) & (qmap[ref_codes.long()] == 0) & (row_codes == ref_codes - 1)
            assert ((row_codes == ref_codes) | sign_fixed).all()


def _noisy_quadratic(device, numel=4096, steps=50):
    """Start point and gradient(p, t) of a separable quadratic, with gradient noise that keeps rounding unbiased."""
    torch.manual_seed(4)
    target = torch.randn(numel, device=device)
    curvature = torch.rand(numel, device=device) + 0.5
    noise = 0.3 * torch.randn(steps, numel, device=device)
    return torch.zeros(numel, device=device), lambda p, t: curvature * (p - target) + noise[t - 1]


@pytest.mark.parametrize(
    "name, lr, hyper",
    [
        ("adam", 1e-2, dict(beta1=0.9, beta2=0.999)),
        ("lion", 1e-3, dict(beta1=0.9, beta2=0.99)),
        ("momentum", 1e-2, dict(beta1=0.9)),
    ],
)
def test_8bit_tracks_32bit(device, name, lr, hyper):
    p0, gradient = _noisy_quadratic(device)
    p32, p8 = p0.clone(), p0.clone()
    state1, state2 = _zero_states(name, p32)
    st = State8bit(name, p8)
    for t in range(1, 51):
        step32(name, p32, gradient(p32, t), state1, state2, lr, t, **hyper)
        step8(name, p8, gradient(p8, t), st, lr, t, **hyper)
    # measured on CPU: parameters within 2.3%, states within 6% (relative L2)
    assert torch.linalg.vector_norm(p8 - p32) <= 0.05 * torch.linalg.vector_norm(p32 - p0)
    for decoded, exact in zip(st.decoded(), (state1, state2), strict=True):
        if exact is not None:
            assert torch.linalg.vector_norm(decoded - exact) <= 0.1 * torch.linalg.vector_norm(exact)


@pytest.mark.parametrize("name", NAMES)
def test_skip_zeros_leaves_zero_gradient_entries_untouched(device, name):
    torch.manual_seed(5)
    p = torch.randn(SHAPE, device=device)
    g = _gradient_with_zeros(p)
    zero = g == 0
    state1, state2 = _random_32bit_states(name, p)
    before = [None if t is None else t.clone() for t in (p, state1, state2)]
    step32(name, p, g, state1, state2, 1e-2, 2, weight_decay=0.1, skip_zeros=True)
    for old, new in zip(before, (p, state1, state2), strict=True):
        if new is None:
            continue
        assert torch.equal(new[..., zero], old[..., zero])
        assert (new[..., ~zero] != old[..., ~zero]).float().mean() > 0.9
    p8, st = torch.randn(SHAPE, device=device), State8bit(name, p)
    p8_before = p8.clone()
    step8(name, p8, g, st, 1e-2, 1, weight_decay=0.1, skip_zeros=True)
    assert torch.equal(p8[zero], p8_before[zero]) and not torch.equal(p8, p8_before)


@pytest.mark.parametrize("name", ["lamb", "lars", "adam", "lion"])
def test_max_unorm_bounds_the_update_norm(device, name):
    torch.manual_seed(6)
    p = torch.randn(1000, device=device)
    g = torch.randn(1000, device=device)
    lr, max_unorm = 1e-2, 0.1
    unclipped, clipped = p.clone(), p.clone()
    step32(name, unclipped, g, *_zero_states(name, p), lr, 1)
    step32(name, clipped, g, *_zero_states(name, p), lr, 1, max_unorm=max_unorm)
    bound = lr * max_unorm * torch.linalg.vector_norm(p)
    full, limited = unclipped - p, clipped - p
    assert torch.linalg.vector_norm(full) > 2 * bound
    torch.testing.assert_close(torch.linalg.vector_norm(limited), bound, rtol=1e-3, atol=0)
    torch.testing.assert_close(limited / limited.norm(), full / full.norm(), rtol=1e-3, atol=1e-5)
    loose = p.clone()
    step32(name, loose, g, *_zero_states(name, p), lr, 1, max_unorm=1e6)
    assert torch.equal(loose, unclipped)


def test_step_and_lr_may_live_on_the_device(device):
    p = torch.randn(300, device=device)
    g = torch.randn(300, device=device)
    expected = p.clone()
    step32("momentum", expected, g, *_zero_states("momentum", p), 1e-2, 1)
    lr, step = torch.tensor(1e-2, device=device), torch.tensor(1.0, device=device)
    torch.ops.lowbit.optimizer_update_32bit("momentum", p, g, torch.zeros_like(p), None, lr, step, *_args())
    assert torch.equal(p, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_steps_never_synchronize(name):
    p = torch.randn(SHAPE, device="cuda")
    g = _gradient_with_zeros(p)
    state1, state2 = _random_32bit_states(name, p)
    st = State8bit(name, p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in (1, 2):  # lr and step stay 0-d CPU tensors
            step32(name, p, g, state1, state2, 1e-2, t, weight_decay=0.1, max_unorm=0.5, skip_zeros=True)
            step8(name, p, g, st, 1e-2, t, weight_decay=0.1, max_unorm=0.5, skip_zeros=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(p).all()


def _bad_calls():
    """(description, call, exception, match) for argument errors."""
    p, g = torch.randn(300), torch.randn(300)
    s = torch.zeros(300)
    lr, step = torch.tensor(1e-3), torch.tensor(1)
    st = State8bit("adam", p)
    op32, op8 = torch.ops.lowbit.optimizer_update_32bit, torch.ops.lowbit.optimizer_update_8bit_blockwise
    return [
        ("unknown name", lambda: op32("sgd", p, g, s, None, lr, step, *_args()), ValueError, "optimizer_name.*adam"),
        ("int p", lambda: op32("momentum", p.long(), g, s, None, lr, step, *_args()), TypeError, "p must"),
        ("g dtype != p dtype", lambda: op32("momentum", p, g.half(), s, None, lr, step, *_args()), TypeError, "g must"),
        ("16-bit state", lambda: op32("momentum", p, g, s.half(), None, lr, step, *_args()), TypeError, "state1"),
        ("g shape", lambda: op32("momentum", p, g[:200], s, None, lr, step, *_args()), ValueError, "g must have shape"),
        ("state1 shape", lambda: op32("momentum", p, g, s[:10], None, lr, step, *_args()), ValueError, "state1"),
        ("ademamix rows", lambda: op32("ademamix", p, g, s, s, lr, step, *_args()), ValueError, "state1"),
        ("missing state2", lambda: op32("adam", p, g, s, None, lr, step, *_args()), ValueError, "state2"),
        ("extra state2", lambda: op32("lion", p, g, s, s, lr, step, *_args()), ValueError, "state2"),
        ("lr not 0-d", lambda: op32("lion", p, g, s, None, lr[None], step, *_args()), ValueError, "lr must be a 0-d"),
        ("int lr", lambda: op32("lion", p, g, s, None, step, step, *_args()), TypeError, "lr must"),
        ("lr on meta", lambda: op32("lion", p, g, s, None, lr.to("meta"), step, *_args()), ValueError, "lr must be on"),
        ("g on meta", lambda: op32("lion", p, g.to("meta"), s, None, lr, step, *_args()), ValueError, "g on meta"),
        (
            "float state (8-bit)",
            lambda: op8("adam", p, g, s, st.state2, *st.tensors()[2:], lr, step, *_args()),
            TypeError,
            "state1",
        ),
        (
            "absmax1 length",
            lambda: op8("adam", p, g, st.state1, st.state2, st.absmax1[:1], *st.tensors()[3:], lr, step, *_args()),
            ValueError,
            "absmax1",
        ),
        (
            "absmax2 missing",
            lambda: op8("adam", p, g, st.state1, st.state2, st.absmax1, None, st.qmap1, st.qmap2, lr, step, *_args()),
            ValueError,
            "absmax2",
        ),
        (
            "qmap1 length",
            lambda: op8("adam", p, g, *st.tensors()[:4], st.qmap1[:16], st.qmap2, lr, step, *_args()),
            ValueError,
            "qmap1",
        ),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0] if isinstance(case, tuple) else "")
def test_bad_arguments_raise_clear_errors(case):
    _, call, exception, match = case
    with pytest.raises(exception, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# The grouped ops: lists of parameters, one step count each, one lr and one pair of maps.

OP32_GROUPED = torch.ops.lowbit.optimizer_update_32bit_grouped
OP8_GROUPED = torch.ops.lowbit.optimizer_update_8bit_blockwise_grouped
# mixed sizes, most not multiples of 256 (and one empty); with the layouts of _entry
GROUP_SHAPES = [(25, 40), (7, 143), (1,), (0,), (300,), (3, 1100), (513,)]
LAYOUTS = ["contiguous", "transposed", "contiguous", "contiguous", "offset", "contiguous", "contiguous"]


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` as a contiguous tensor, a transposed view, or a view one element into its storage (misaligned)."""
    if layout == "transposed" and values.dim() == 2:
        return values.t().contiguous().t()
    if layout == "offset":
        storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
        return storage[1:].view(values.shape).copy_(values)
    return values


def _entry(name, bits, shape, dtype, device, step, layout="contiguous", qmap1=None) -> list:
    """One parameter's fresh random [p, g, state1, state2, absmax1, absmax2, step] (None where absent)."""
    p = _laid_out(torch.randn(shape, device=device).to(dtype), layout)
    g = torch.randn(shape, device=device)
    g.view(-1)[::7] = 0
    g = _laid_out(g.to(dtype), layout)
    step = torch.tensor(float(step))
    if bits == 32:
        state1, state2 = _random_32bit_states(name, p)
        return [p, g, _laid_out(state1, layout), state2, None, None, step]
    st = State8bit(name, p)
    positive = name in ("rmsprop", "adagrad")  # sums of squares: codes of nonnegative values
    st.state1.random_(int((st.qmap1 < 0).sum()) if positive else 0, 256)
    st.absmax1.uniform_(0.1, 1.0)
    if st.state2 is not None:
        st.state2.random_(0, 256)
        st.absmax2.uniform_(0.1, 1.0)
    return [p, g, _laid_out(st.state1, layout), st.state2, st.absmax1, st.absmax2, step]


def _group(name, bits, dtype, device, shapes=GROUP_SHAPES, layouts=LAYOUTS, seed=0) -> list[list]:
    """Entries at steps 1, 2, ... (each parameter keeps its own count); the same tensors for the same seed."""
    torch.manual_seed(seed)
    pairs = enumerate(zip(shapes, layouts, strict=True), start=1)
    return [_entry(name, bits, shape, dtype, device, step, layout) for step, (shape, layout) in pairs]


def _columns(entries: list[list]) -> list[list]:
    """The grouped ops' lists: one per argument, empty where the optimizer has no such state."""
    return [[] if column[0] is None else list(column) for column in zip(*entries, strict=True)]


def _maps(name, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    two = OPTIMIZERS[name].has_state2
    return create_dynamic_map(signed=True).to(device), create_dynamic_map(signed=False).to(device) if two else None


def _hyper(name, max_unorm=0.0) -> tuple:
    """(beta1, ..., skip_zeros) with weight decay, gradient scaling and skipped zeros."""
    return (*_args(weight_decay=0.01), 0.5, max_unorm, True)


def _step_each(name, bits, entries, lr, hyper, qmaps) -> None:
    for p, g, state1, state2, absmax1, absmax2, step in entries:
        if bits == 32:
            torch.ops.lowbit.optimizer_update_32bit(name, p, g, state1, state2, lr, step, *hyper)
        else:
            torch.ops.lowbit.optimizer_update_8bit_blockwise(
                name, p, g, state1, state2, absmax1, absmax2, *qmaps, lr, step, *hyper
            )


def _step_grouped(name, bits, entries, lr, hyper, qmaps) -> None:
    p, g, state1, state2, absmax1, absmax2, steps = _columns(entries)
    if bits == 32:
        OP32_GROUPED(name, p, g, state1, state2, lr, steps, *hyper)
    else:
        OP8_GROUPED(name, p, g, state1, state2, absmax1, absmax2, *qmaps, lr, steps, *hyper)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (NaN payloads and signed zeros included)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]) if t.is_floating_point() else t


def _assert_same_results(grouped: list[list], each: list[list]) -> None:
    for index, (a, b) in enumerate(zip(grouped, each, strict=True)):
        for position, (x, y) in enumerate(zip(a, b, strict=True)):
            if x is not None:
                assert torch.equal(_bits(x), _bits(y)), f"entry {index}, argument {position}"


@pytest.mark.parametrize("max_unorm", [0.0, 0.5])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_grouped_equals_per_tensor_op(device, name, dtype, bits, max_unorm):
    grouped, each = _group(name, bits, dtype, device), _group(name, bits, dtype, device)
    lr, hyper, qmaps = torch.tensor(1e-2), _hyper(name, max_unorm), _maps(name, device)
    for _ in range(2):  # the second step from the states of the first
        _step_grouped(name, bits, grouped, lr, hyper, qmaps)
        _step_each(name, bits, each, lr, hyper, qmaps)
        _assert_same_results(grouped, each)
    assert not torch.equal(grouped[0][0], _group(name, bits, dtype, device)[0][0])  # it stepped


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", ["adam", "ademamix", "lion", "momentum"])
def test_grouped_many_tensors(device, name, bits):
    """More tensors than one CUDA launch takes: the list is split into several launches."""
    sizes = torch.randint(1, 3000, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    shapes, layouts = [(n,) for n in sizes], ["contiguous"] * len(sizes)
    grouped = _group(name, bits, torch.bfloat16, device, shapes, layouts, seed=2)
    each = _group(name, bits, torch.bfloat16, device, shapes, layouts, seed=2)
    lr, hyper, qmaps = torch.tensor(1e-3), _hyper(name), _maps(name, device)
    _step_grouped(name, bits, grouped, lr, hyper, qmaps)
    _step_each(name, bits, each, lr, hyper, qmaps)
    _assert_same_results(grouped, each)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_grouped_lr_and_steps_on_the_device(device, name, bits):
    grouped, each = _group(name, bits, torch.float32, device), _group(name, bits, torch.float32, device)
    for entry in grouped:
        entry[-1] = entry[-1].to(device=device, dtype=torch.int64)
    lr, hyper, qmaps = torch.tensor(1e-2, dtype=torch.float64), _hyper(name), _maps(name, device)
    _step_grouped(name, bits, grouped, lr.to(device), hyper, qmaps)
    _step_each(name, bits, each, lr, hyper, qmaps)
    _assert_same_results([e[:-1] for e in grouped], [e[:-1] for e in each])


def test_grouped_empty_lists_do_nothing(device):
    lr, hyper = torch.tensor(1e-2), _hyper("adam")
    OP32_GROUPED("adam", [], [], [], [], lr, [], *hyper)
    OP8_GROUPED("lion", [], [], [], [], [], [], *_maps("lion", device), lr, [], *hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_grouped(device, name, bits, dtype):
    p, g, state1, state2, absmax1, absmax2, steps = _columns(_group(name, bits, dtype, device, seed=3))
    lr, hyper = torch.tensor(1e-2), _hyper(name, max_unorm=0.5)
    if bits == 32:
        args = (name, p, g, state1, state2, lr, steps, *hyper)
        torch.library.opcheck(OP32_GROUPED, args)
    else:
        args = (name, p, g, state1, state2, absmax1, absmax2, *_maps(name, device), lr, steps, *hyper)
        torch.library.opcheck(OP8_GROUPED, args)


def _bad_grouped_calls():
    """(description, call, exception, match) for argument errors of the grouped ops."""
    lr, hyper = torch.tensor(1e-3), _args()
    p32, g32, s1, s2, _, _, t = _columns(
        _group("adam", 32, torch.float32, "cpu", [(300,), (10, 3)], ["contiguous"] * 2)
    )
    p8, g8, c1, c2, a1, a2, t8 = _columns(
        _group("adam", 8, torch.float32, "cpu", [(300,), (10, 3)], ["contiguous"] * 2)
    )
    q1, q2 = _maps("adam", "cpu")
    one, two = torch.zeros(300), torch.zeros(30)

    def op32(name="adam", p=p32, g=g32, state1=s1, state2=s2, step=t):
        return OP32_GROUPED(name, p, g, state1, state2, lr, step, *hyper)

    def op8(p=p8, state1=c1, state2=c2, absmax1=a1, absmax2=a2, qmap2=q2):
        return OP8_GROUPED("adam", p, g8, state1, state2, absmax1, absmax2, q1, qmap2, lr, t8, *hyper)

    return [
        ("unknown name", lambda: op32(name="sgd"), ValueError, "optimizer_name.*adam"),
        ("g list short", lambda: op32(g=g32[:1]), ValueError, r"g must hold one tensor per parameter \(2\), got 1"),
        ("step list long", lambda: op32(step=[*t, t[0]]), ValueError, "step must hold one tensor per parameter"),
        ("state2 missing", lambda: op32(state2=[]), ValueError, "state2 must hold one tensor per parameter"),
        ("state2 for lion", lambda: op32("lion", state2=s2), ValueError, "'lion' has one state: state2 must be empty"),
        ("p dtypes", lambda: op32(p=[p32[0], p32[1].half()]), TypeError, r"p\[1\] must have the dtype of p\[0\]"),
        ("p devices", lambda: op32(p=[p32[0], p32[1].to("meta")]), ValueError, r"one device.*p\[1\] on meta"),
        ("entry g shape", lambda: op32(g=[g32[0], g32[0]]), ValueError, "entry 1 of the lists: g must have shape"),
        ("entry state dtype", lambda: op32(state1=[one, two.half()]), TypeError, "entry 1 of the lists: state1"),
        ("entry step", lambda: op32(step=[t[0], t[1][None]]), ValueError, "entry 1 of the lists: step must be a 0-d"),
        ("8-bit float state", lambda: op8(state1=[one, c1[1]]), TypeError, "entry 0 of the lists: state1"),
        ("absmax1 length", lambda: op8(absmax1=[a1[0][:1], a1[1]]), ValueError, "entry 0 of the lists: absmax1"),
        ("absmax2 list short", lambda: op8(absmax2=a2[:1]), ValueError, "absmax2 must hold one tensor per parameter"),
        ("qmap2 missing", lambda: op8(qmap2=None), ValueError, "entry 0 of the lists: qmap2 must be given"),
    ]


@pytest.mark.parametrize("case", _bad_grouped_calls(), ids=lambda case: case[0] if isinstance(case, tuple) else "")
def test_grouped_bad_arguments_raise_clear_errors(case):
    _, call, exception, match = case
    with pytest.raises(exception, match=match):
        call()
