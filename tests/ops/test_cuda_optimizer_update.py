"""The CUDA optimizer kernels of csrc/optimizer_update.cu against the CPU reference kernels run on the same inputs.

Every optimizer name x parameter dtype x 32/8-bit state, several steps: each step starts both devices from the
same tensors (the CPU's results of the step before), so one differing code cannot compound. The kernels repeat
the reference's float32 operations one by one, so results agree to the last bit except for the bias corrections
(beta**step: glibc powf on the CPU, a float64 pow here) and the max_unorm norms (summed in another order);
tolerances allow a few float32 ulps, and 8-bit codes may differ only in a tiny fraction of elements, by one code.
"""

import pytest
import torch

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit.codebooks import create_dynamic_map
from torchlowbit.ops import CUDA_REFERENCE_OPS
from torchlowbit.ops.optimizer_update import OPTIMIZERS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = sorted(OPTIMIZERS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP32 = torch.ops.lowbit.optimizer_update_32bit
OP8 = torch.ops.lowbit.optimizer_update_8bit_blockwise
HYPER = (0.9, 0.99, 0.999, 5.0, 1e-8)  # beta1, beta2, beta3, alpha, eps
SHAPE = (25, 40)  # 1000 elements: four blocks of 256, the last one partial
CONFIGS = {
    # weight_decay, gnorm_scale, max_unorm, skip_zeros
    "plain": (0.0, 1.0, 0.0, False),
    "decay_gnorm": (0.05, 0.5, 0.0, False),
    "skip_zeros": (0.05, 1.0, 0.0, True),
    "max_unorm": (0.05, 1.0, 0.02, False),  # small enough that every optimizer's update is clipped
}
MAX_CODE_MISMATCH = 1e-3  # fraction of 8-bit codes allowed to differ (by one code) from the CPU reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gradients(shape, dtype, steps, gen):
    grads = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen)
        g.view(-1)[3::7] = 0  # exact zeros for skip_zeros
        grads.append(g.to(dtype))
    return grads


def _states32(name, shape, gen):
    opt = OPTIMIZERS[name]
    s1_shape = (opt.state1_rows, *shape) if opt.state1_rows > 1 else shape
    if name in ("rmsprop", "adagrad"):  # sums of squares are positive
        state1 = torch.rand(s1_shape, generator=gen) + 0.1
    else:
        state1 = torch.randn(s1_shape, generator=gen)
    state2 = torch.rand(shape, generator=gen) + 0.1 if opt.has_state2 else None
    return state1, state2


def _states8(name, shape, gen, qmap1=None, qmap2=None):
    """(state1, state2, absmax1, absmax2, qmap1, qmap2) on the CPU with random codes and scales."""
    opt = OPTIMIZERS[name]
    numel = torch.Size(shape).numel()
    blocks = -(-numel // 256)
    rows = opt.state1_rows
    qmap1 = create_dynamic_map(signed=True) if qmap1 is None else qmap1
    s1_shape = (rows, *shape) if rows > 1 else shape
    low = 127 if name in ("rmsprop", "adagrad") else 0  # nonnegative codes of the signed map for sums of squares
    if qmap1 is not None and name in ("rmsprop", "adagrad"):
        low = int((qmap1 < 0).sum())
    state1 = torch.randint(low, 256, s1_shape, generator=gen, dtype=torch.uint8)
    absmax1 = torch.rand((rows, blocks) if rows > 1 else (blocks,), generator=gen) + 0.05
    if not opt.has_state2:
        return state1, None, absmax1, None, qmap1, None
    qmap2 = create_dynamic_map(signed=False) if qmap2 is None else qmap2
    state2 = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    absmax2 = torch.rand(blocks, generator=gen) + 0.05
    return state1, state2, absmax1, absmax2, qmap1, qmap2


def _cuda(tensors):
    return [None if t is None else t.cuda() for t in tensors]


def _clone(tensors):
    return [None if t is None else t.clone() for t in tensors]


def _scalars(lr, step, device="cpu", lr_dtype=torch.float32, step_dtype=torch.float32):
    return torch.tensor(lr, dtype=lr_dtype, device=device), torch.tensor(step, dtype=step_dtype, device=device)


def _assert_float_close(actual, expected, what):
    """Within a few float32 ulps (relative to the tensor's scale); 16-bit values within one of their ulps."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    if expected.dtype == torch.float32:
        rtol, atol = 2e-6, 1e-6 * scale
    else:
        rtol, atol = torch.finfo(expected.dtype).eps, 1e-6 * scale
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_codes_close(actual, expected, what):
    """8-bit codes: equal except for a tiny fraction that is one code away."""
    actual = actual.cpu()
    assert actual.dtype == torch.uint8 and actual.shape == expected.shape, what
    differ = actual != expected
    fraction = differ.float().mean().item()
    assert fraction <= MAX_CODE_MISMATCH, f"{what}: {fraction:.2e} of the codes differ from the CPU reference"
    if differ.any():
        gap = (actual[differ].int() - expected[differ].int()).abs()
        assert (gap == 1).all(), f"{what}: codes differ by {gap.max().item()}"


def _run32(name, p, g, states, lr, step, config, device):
    state1, state2 = states
    wd, gnorm, max_unorm, skip = config
    OP32(name, p, g, state1, state2, lr, step, *HYPER, wd, gnorm, max_unorm, skip)


def _run8(name, p, g, states, lr, step, config):
    wd, gnorm, max_unorm, skip = config
    OP8(name, p, g, *states, lr, step, *HYPER, wd, gnorm, max_unorm, skip)


def _compare_steps(name, dtype, bits, config, shape=SHAPE, steps=3, seed=0, states=None, scalars_device="cpu",
                   lr_dtype=torch.float32, step_dtype=torch.float32):  # fmt: skip
    """Steps both devices from the same tensors and compares p and the states after each step."""
    gen = _gen(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    grads = _gradients(shape, dtype, steps, gen)
    if states is None:
        states = _states32(name, shape, gen) if bits == 32 else _states8(name, shape, gen)
    states = list(states)
    for t, g in enumerate(grads, start=1):
        lr = 1e-2 if name != "lion" else 1e-3
        cpu_p, cpu_states = p.clone(), _clone(states)
        dev_p, dev_states = p.cuda(), _cuda(states)
        lr_cpu, step_cpu = _scalars(lr, t, "cpu", lr_dtype, step_dtype)
        lr_dev, step_dev = _scalars(lr, t, scalars_device, lr_dtype, step_dtype)
        if bits == 32:
            _run32(name, cpu_p, g, cpu_states, lr_cpu, step_cpu, config, "cpu")
            _run32(name, dev_p, g.cuda(), dev_states, lr_dev, step_dev, config, "cuda")
        else:
            _run8(name, cpu_p, g, cpu_states, lr_cpu, step_cpu, config)
            _run8(name, dev_p, g.cuda(), dev_states, lr_dev, step_dev, config)
        where = f"{name} {dtype} {bits}-bit step {t}"
        assert p.numel() < 16 or not torch.equal(cpu_p, p), f"{where}: the reference did not move p"
        _assert_float_close(dev_p, cpu_p, f"{where} p")
        if bits == 32:
            for i, (d, c) in enumerate(zip(dev_states, cpu_states, strict=True)):
                if c is not None:
                    _assert_float_close(d, c, f"{where} state{i + 1}")
        else:
            codes = (("state1", 0, 2), ("state2", 1, 3))
            for label, ci, ai in codes:
                if cpu_states[ci] is None:
                    continue
                _assert_codes_close(dev_states[ci], cpu_states[ci], f"{where} {label}")
                _assert_float_close(dev_states[ai], cpu_states[ai], f"{where} absmax of {label}")
        p, states = cpu_p, cpu_states


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_32bit_matches_cpu_reference(name, dtype, config):
    _compare_steps(name, dtype, 32, CONFIGS[config])


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_8bit_matches_cpu_reference(name, dtype, config):
    _compare_steps(name, dtype, 8, CONFIGS[config])


# (7, 143): 1001 elements, AdEMAMix's second state row is not 8-byte aligned; (3, 4099): several CTAs;
# (1,): one element; (2_200_001,): more blocks than warps in the grid (the persistent loop), partial last block.
SIZES = [(1,), (7, 143), (3, 4099), (2_200_001,)]


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("name", ["adam", "ademamix", "lion", "lars"])
def test_sizes(name, shape, bits):
    dtypes = [torch.float32, torch.bfloat16] if torch.Size(shape).numel() > 1_000_000 else DTYPES
    for dtype in dtypes:
        config = CONFIGS["max_unorm"] if name == "lars" else CONFIGS["skip_zeros"]
        _compare_steps(name, dtype, bits, config, shape=shape, steps=2)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize(
    "lr_dtype, step_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.int64), (torch.float32, torch.int32),
     (torch.float64, torch.float64)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "lion"])
def test_lr_and_step_on_the_device(name, lr_dtype, step_dtype, bits):
    _compare_steps(name, torch.float32, bits, CONFIGS["decay_gnorm"], scalars_device="cuda", lr_dtype=lr_dtype,
                   step_dtype=step_dtype)  # fmt: skip
    # and bit-identical to the same step with CPU scalars
    gen = _gen(9)
    p = torch.randn(SHAPE, generator=gen).cuda()
    g = torch.randn(SHAPE, generator=gen).cuda()
    states = _cuda(_states32(name, SHAPE, gen) if bits == 32 else _states8(name, SHAPE, gen))
    results = []
    for device in ("cpu", "cuda"):
        pp, ss = p.clone(), _clone(states)
        lr, step = _scalars(1e-2, 3, device, lr_dtype, step_dtype)
        if bits == 32:
            _run32(name, pp, g, ss, lr, step, CONFIGS["decay_gnorm"], device)
        else:
            _run8(name, pp, g, ss, lr, step, CONFIGS["decay_gnorm"])
        results.append([pp, *ss])
    for a, b in zip(*results, strict=True):
        if a is not None:
            assert torch.equal(a, b)


def test_8bit_search_fallback_and_unsorted_maps(monkeypatch):
    """The Eytzinger search (forced, and for maps no table fits) and maps given unsorted agree with the CPU."""
    gen = _gen(11)
    signed, unsigned = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
    perm1, perm2 = torch.randperm(256, generator=gen), torch.randperm(256, generator=gen)
    # random sorted maps whose close midpoints defeat the tables
    close = 0.5 + 1e-7 * torch.arange(10)  # distinct midpoints closer than any table's bins
    crowded = torch.cat([torch.rand(245, generator=gen) * 2 - 1, close, torch.zeros(1)]).sort().values
    for q1, q2 in [(signed[perm1], unsigned[perm2]), (crowded, unsigned)]:
        for name in ("adam", "lion", "ademamix"):
            states = _states8(name, SHAPE, _gen(12), qmap1=q1, qmap2=q2)
            _compare_steps(name, torch.float32, 8, CONFIGS["plain"], states=states, steps=2)
    monkeypatch.setenv("TORCHLOWBIT_OPTIM_SEARCH", "tree")
    for name in NAMES:
        _compare_steps(name, torch.bfloat16, 8, CONFIGS["skip_zeros"], steps=2)


def test_noncontiguous_and_misaligned_tensors():
    """Views are updated in place (through a contiguous copy), misaligned ones take the element-wise path."""
    gen = _gen(13)
    for bits in (32, 8):
        for name in ("adam", "ademamix", "momentum"):
            p0 = torch.randn(SHAPE, generator=gen)
            g = torch.randn(SHAPE, generator=gen)
            states = _states32(name, SHAPE, gen) if bits == 32 else _states8(name, SHAPE, gen)
            lr, step = _scalars(1e-2, 2)
            expected_p, expected_states = p0.clone(), _clone(states)
            if bits == 32:
                _run32(name, expected_p, g, expected_states, lr, step, CONFIGS["decay_gnorm"], "cpu")
            else:
                _run8(name, expected_p, g, expected_states, lr, step, CONFIGS["decay_gnorm"])
            # p misaligned (storage offset 1), g transposed, state1 transposed (non-contiguous)
            p_storage = torch.zeros(p0.numel() + 1, device="cuda")
            p = p_storage[1:].view(SHAPE)
            p.copy_(p0)
            g_dev = g.t().contiguous().cuda().t()
            dev_states = _cuda(states)
            s1 = dev_states[0]
            s1_view = s1.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not s1_view.is_contiguous()
            dev_states[0] = s1_view
            if bits == 32:
                _run32(name, p, g_dev, dev_states, lr, step, CONFIGS["decay_gnorm"], "cuda")
            else:
                _run8(name, p, g_dev, dev_states, lr, step, CONFIGS["decay_gnorm"])
            _assert_float_close(p, expected_p, f"{name} {bits}-bit p")
            assert torch.equal(p_storage[:1].cpu(), torch.zeros(1))
            for i, (d, e) in enumerate(zip(dev_states, expected_states, strict=True)):
                if e is None:
                    continue
                if e.dtype == torch.uint8:
                    _assert_codes_close(d, e, f"{name} state {i}")
                else:
                    _assert_float_close(d, e, f"{name} state {i}")


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, bits):
    gen = _gen(14)
    p = torch.randn(SHAPE, generator=gen).cuda()
    g = torch.randn(SHAPE, generator=gen).cuda()
    states = _cuda(_states32(name, SHAPE, gen) if bits == 32 else _states8(name, SHAPE, gen))
    device = "cuda" if name in ("adam", "lion", "lars") else "cpu"
    lr, step = _scalars(1e-2, 3, device)
    scalars = (lr, step, *HYPER, 0.01, 0.5, 0.5, True)
    if bits == 32:
        torch.library.opcheck(OP32, (name, p, g, *states, *scalars))
    else:
        torch.library.opcheck(OP8, (name, p, g, *states, *scalars))


@pytest.mark.parametrize("max_unorm", [0.0, 0.02])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_graph_capture(bits, max_unorm):
    """A captured step replays like eager steps; device lr and step are read at replay time."""
    name = "adam"
    gen = _gen(15)
    p0 = torch.randn(SHAPE, generator=gen).cuda()
    g = torch.randn(SHAPE, generator=gen).cuda()
    states0 = _cuda(_states32(name, SHAPE, gen) if bits == 32 else _states8(name, SHAPE, gen))
    config = (0.01, 1.0, max_unorm, False)

    def step_fn(p, states, lr, step):
        step.add_(1)
        if bits == 32:
            _run32(name, p, g, states, lr, step, config, "cuda")
        else:
            _run8(name, p, g, states, lr, step, config)

    # eager: three steps with lr 1e-2, 5e-3, 2e-3
    p_eager, states_eager = p0.clone(), _clone(states0)
    lr_eager, step_eager = _scalars(1e-2, 0, "cuda")
    for lr_value in (1e-2, 5e-3, 2e-3):
        lr_eager.fill_(lr_value)
        step_fn(p_eager, states_eager, lr_eager, step_eager)

    p, states = p0.clone(), _clone(states0)
    lr, step = _scalars(1e-2, 0, "cuda")
    warm_p, warm_states, warm_step = p0.clone(), _clone(states0), step.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        step_fn(warm_p, warm_states, lr, warm_step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn(p, states, lr, step)
    assert torch.equal(p, p0)  # capture ran nothing
    for lr_value in (1e-2, 5e-3, 2e-3):
        lr.fill_(lr_value)
        graph.replay()
    torch.cuda.synchronize()
    assert step.item() == 3
    assert torch.equal(p, p_eager)
    for a, b in zip(states, states_eager, strict=True):
        if a is not None:
            assert torch.equal(a, b)


def test_steps_never_synchronize_with_device_scalars():
    gen = _gen(16)
    p = torch.randn(SHAPE, generator=gen).cuda()
    g = torch.randn(SHAPE, generator=gen).cuda()
    lr, step = _scalars(1e-2, 2, "cuda", torch.float64, torch.int64)
    work = [(name, _cuda(_states32(name, SHAPE, gen)), _cuda(_states8(name, SHAPE, gen))) for name in NAMES]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, s32, s8 in work:
            for max_unorm in (0.0, 0.5):
                OP32(name, p, g, *s32, lr, step, *HYPER, 0.01, 1.0, max_unorm, True)
                OP8(name, p, g, *s8, lr, step, *HYPER, 0.01, 1.0, max_unorm, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(p).all()


def test_cuda_runs_the_native_kernels():
    ops = ("optimizer_update_32bit", "optimizer_update_8bit_blockwise")
    for op in (*ops, *(f"{op}_grouped" for op in ops)):
        assert op not in CUDA_REFERENCE_OPS
        table = torch._C._dispatch_dump_table(f"lowbit::{op}")
        cuda = [line for line in table.splitlines() if line.startswith("CUDA")]
        assert cuda and "optimizer_update.cu" in cuda[0], table


def _bad_calls():
    p, g = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    s = torch.zeros(300, device="cuda")
    lr, step = _scalars(1e-3, 1)
    st = _cuda(_states8("adam", (300,), _gen(17)))
    h = (*HYPER, 0.0)
    return [
        ("unknown name", lambda: OP32("sgd", p, g, s, None, lr, step, *h), ValueError, "optimizer_name.*adam"),
        ("g dtype", lambda: OP32("momentum", p, g.half(), s, None, lr, step, *h), TypeError, "g must"),
        ("g shape", lambda: OP32("momentum", p, g[:200], s, None, lr, step, *h), ValueError, "g must have shape"),
        ("state1 dtype", lambda: OP32("momentum", p, g, s.half(), None, lr, step, *h), TypeError, "state1"),
        ("ademamix rows", lambda: OP32("ademamix", p, g, s, s, lr, step, *h), ValueError, "state1"),
        ("missing state2", lambda: OP32("adam", p, g, s, None, lr, step, *h), ValueError, "state2"),
        ("extra state2", lambda: OP32("lion", p, g, s, s, lr, step, *h), ValueError, "state2"),
        ("lr not 0-d", lambda: OP32("lion", p, g, s, None, lr[None], step, *h), ValueError, "lr must be a 0-d"),
        ("int lr", lambda: OP32("lion", p, g, s, None, step.long(), step, *h), TypeError, "lr must"),
        ("g on the CPU", lambda: OP32("lion", p, g.cpu(), s, None, lr, step, *h), ValueError, "one device"),
        ("float state (8-bit)", lambda: OP8("adam", p, g, s, *st[1:], lr, step, *h), TypeError, "state1"),
        ("absmax1 length", lambda: OP8("adam", p, g, st[0], st[1], st[2][:1], *st[3:], lr, step, *h), ValueError,
         "absmax1"),
        ("absmax2 missing", lambda: OP8("adam", p, g, st[0], st[1], st[2], None, *st[4:], lr, step, *h), ValueError,
         "absmax2"),
        ("qmap1 length", lambda: OP8("adam", p, g, *st[:4], st[4][:16], st[5], lr, step, *h), ValueError, "qmap1"),
    ]  # fmt: skip


def test_bad_arguments_raise_clear_errors_on_cuda():
    for _description, call, exception, match in _bad_calls():
        with pytest.raises(exception, match=match):
            call()


# ---------------------------------------------------------------------------------------------------
# The grouped ops: one launch for many tensors (tests/ops/test_optimizer_update.py checks them bit for bit against
# the single-tensor ops on every device).

OP32_GROUPED = torch.ops.lowbit.optimizer_update_32bit_grouped
OP8_GROUPED = torch.ops.lowbit.optimizer_update_8bit_blockwise_grouped
GROUP_SHAPES = [(25, 40), (7, 143), (1,), (300,), (3, 4099), (513,)]


def _grouped_inputs(name, bits, dtype, shapes=GROUP_SHAPES, seed=20):
    """CPU (p, g, state lists, maps, steps): one list per argument, empty where absent; step i + 1 for tensor i."""
    gen = _gen(seed)
    ps, gs, states = [], [], []
    for shape in shapes:
        ps.append(torch.randn(shape, generator=gen).to(dtype))
        gs.append(_gradients(shape, dtype, 1, gen)[0])
        states.append(_states32(name, shape, gen) if bits == 32 else _states8(name, shape, gen))
    columns = [[] if column[0] is None else list(column) for column in zip(*states, strict=True)]
    maps = () if bits == 32 else (states[0][4], states[0][5])
    steps = [torch.tensor(float(t)) for t in range(1, len(shapes) + 1)]
    return ps, gs, columns[: 4 if bits == 8 else 2], maps, steps


def _run_grouped(name, ps, gs, states, maps, lr, steps, config):
    if maps:
        OP8_GROUPED(name, ps, gs, *states, *maps, lr, steps, *HYPER, *config)
    else:
        OP32_GROUPED(name, ps, gs, *states, lr, steps, *HYPER, *config)


def _to_cuda(inputs):
    ps, gs, states, maps, steps = inputs
    return _cuda(ps), _cuda(gs), [_cuda(column) for column in states], tuple(_cuda(maps)), steps


@pytest.mark.parametrize("config", ["plain", "skip_zeros", "max_unorm"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_grouped_matches_cpu_reference(name, dtype, bits, config):
    cpu = _grouped_inputs(name, bits, dtype)
    dev = _to_cuda(cpu)
    lr = torch.tensor(1e-2 if name != "lion" else 1e-3)
    _run_grouped(name, *cpu[:4], lr, cpu[4], CONFIGS[config])
    _run_grouped(name, *dev[:4], lr, dev[4], CONFIGS[config])
    where = f"{name} {dtype} {bits}-bit"
    for i, (d, c) in enumerate(zip(dev[0], cpu[0], strict=True)):
        _assert_float_close(d, c, f"{where} p[{i}]")
    for label, d_column, c_column in zip(("state1", "state2", "absmax1", "absmax2"), dev[2], cpu[2], strict=False):
        for i, (d, c) in enumerate(zip(d_column, c_column, strict=True)):
            check = _assert_codes_close if c.dtype == torch.uint8 else _assert_float_close
            check(d, c, f"{where} {label}[{i}]")


def test_grouped_steps_never_synchronize():
    work = []
    for name in NAMES:
        for bits in (32, 8):
            ps, gs, states, maps, steps = _to_cuda(_grouped_inputs(name, bits, torch.float32))
            work.append((name, ps, gs, states, maps, steps, [s.cuda() for s in steps]))
    lr_cpu, lr_dev = torch.tensor(1e-3), torch.tensor(1e-3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, ps, gs, states, maps, cpu_steps, dev_steps in work:
            for max_unorm in (0.0, 0.5):
                config = (0.01, 1.0, max_unorm, True)
                _run_grouped(name, ps, gs, states, maps, lr_cpu, cpu_steps, config)
                _run_grouped(name, ps, gs, states, maps, lr_dev, dev_steps, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for _, ps, *_ in work for p in ps)


@pytest.mark.parametrize("bits", [32, 8])
def test_grouped_cuda_graph_capture(bits):
    """A captured grouped step replays like eager steps; device lr and steps are read at replay time."""
    name, config = "adam", (0.01, 1.0, 0.0, False)
    ps0, gs, states0, maps, _ = _to_cuda(_grouped_inputs(name, bits, torch.float32))

    def fresh():
        return [p.clone() for p in ps0], [_clone(column) for column in states0]

    def step_fn(ps, states, lr, steps):
        torch._foreach_add_(steps, 1)
        _run_grouped(name, ps, gs, states, maps, lr, steps, config)

    lrs = (1e-2, 5e-3, 2e-3)
    p_eager, states_eager = fresh()
    lr_eager, steps_eager = torch.tensor(0.0, device="cuda"), [torch.zeros((), device="cuda") for _ in ps0]
    for value in lrs:
        lr_eager.fill_(value)
        step_fn(p_eager, states_eager, lr_eager, steps_eager)

    p, states = fresh()
    lr, steps = torch.tensor(lrs[0], device="cuda"), [torch.zeros((), device="cuda") for _ in ps0]
    warm_p, warm_states = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        step_fn(warm_p, warm_states, lr, [s.clone() for s in steps])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn(p, states, lr, steps)
    for value in lrs:
        lr.fill_(value)
        graph.replay()
    torch.cuda.synchronize()
    assert all(s.item() == 3 for s in steps)
    for a, b in zip(p, p_eager, strict=True):
        assert torch.equal(a, b)
    for column, column_eager in zip(states, states_eager, strict=True):
        for a, b in zip(column, column_eager, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("search", ["table", "tree"])
def test_grouped_8bit_equals_single_tensor_steps(monkeypatch, search):
    if search == "tree":
        monkeypatch.setenv("TORCHLOWBIT_OPTIM_SEARCH", "tree")
    shapes = [(7, 143), (2048,), (3, 4099), (100_003,)]
    lr, config = torch.tensor(1e-3), CONFIGS["skip_zeros"]
    for name in NAMES:
        grouped = _to_cuda(_grouped_inputs(name, 8, torch.bfloat16, shapes))
        _run_grouped(name, *grouped[:4], lr, grouped[4], config)
        ps, gs, states, maps, steps = _to_cuda(_grouped_inputs(name, 8, torch.bfloat16, shapes))
        for i, (p, g, step) in enumerate(zip(ps, gs, steps, strict=True)):
            state1, state2, absmax1, absmax2 = (column[i] if column else None for column in states)
            OP8(name, p, g, state1, state2, absmax1, absmax2, *maps, lr, step, *HYPER, *config)
        for a, b in zip([*grouped[0], *sum(grouped[2], [])], [*ps, *sum(states, [])], strict=True):
            assert torch.equal(a, b), name


def _bad_grouped_calls():
    ps, gs, (state1, state2), _, steps = _to_cuda(_grouped_inputs("adam", 32, torch.float32, [(300,), (10, 3)]))
    lr, h = torch.tensor(1e-3), (*HYPER, 0.0)

    def op32(p=ps, g=gs, s1=state1, s2=state2, step=steps, name="adam"):
        return OP32_GROUPED(name, p, g, s1, s2, lr, step, *h)

    return [
        ("g list short", lambda: op32(g=gs[:1]), ValueError, r"g must hold one tensor per parameter \(2\), got 1"),
        ("state2 for lion", lambda: op32(name="lion"), ValueError, "'lion' has one state: state2 must be empty"),
        ("p dtypes", lambda: op32(p=[ps[0], ps[1].half()]), TypeError, r"p\[1\] must have the dtype of p\[0\]"),
        ("p devices", lambda: op32(p=[ps[0], ps[1].cpu()]), ValueError, r"one device.*p\[1\] on cpu"),
        ("entry g shape", lambda: op32(g=[gs[0], gs[0]]), ValueError, "entry 1 of the lists: g must have shape"),
        ("entry state dtype", lambda: op32(s1=[state1[0], state1[1].half()]), TypeError, "entry 1 of the lists"),
    ]


def test_grouped_bad_arguments_raise_clear_errors_on_cuda():
    for _description, call, exception, match in _bad_grouped_calls():
        with pytest.raises(exception, match=match):
            call()
