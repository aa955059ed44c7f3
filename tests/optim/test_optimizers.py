"""torchlowbit.optim: the optimizer classes against torch.optim, 8-bit against 32-bit, state dicts, compile."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchlowbit as bnb
from torchlowbit.optim.optimizer import Optimizer8bit

# (ours, torch's, kwargs shared by both)
MATCHES_TORCH = [
    (bnb.optim.Adam32bit, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)),
    (bnb.optim.AdamW32bit, torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    (bnb.optim.SGD32bit, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
    (bnb.optim.RMSprop32bit, torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-8, weight_decay=0.01)),
    (bnb.optim.Adagrad32bit, torch.optim.Adagrad, dict(lr=1e-2, eps=1e-10, weight_decay=0.01)),
]
EIGHT_BIT = [
    (bnb.optim.Adam8bit, bnb.optim.Adam32bit, dict(lr=1e-3)),
    (bnb.optim.AdamW8bit, bnb.optim.AdamW32bit, dict(lr=1e-3)),
    (bnb.optim.Lion8bit, bnb.optim.Lion32bit, dict(lr=1e-4)),
    (bnb.optim.SGD8bit, bnb.optim.SGD32bit, dict(lr=1e-2, momentum=0.9)),
    (bnb.optim.RMSprop8bit, bnb.optim.RMSprop32bit, dict(lr=1e-3)),
    (bnb.optim.Adagrad8bit, bnb.optim.Adagrad32bit, dict(lr=1e-2)),
    (bnb.optim.AdEMAMix8bit, bnb.optim.AdEMAMix32bit, dict(lr=1e-3)),
]


def _param(device, dtype=torch.float32, shape=(64, 80), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))


def _grads(device, steps, shape=(64, 80), seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 0.1).to(device=device, dtype=dtype) for _ in range(steps)]


def _run(optimizer, p, grads):
    for g in grads:
        p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("ours, theirs, kwargs", MATCHES_TORCH, ids=lambda v: getattr(v, "__name__", ""))
def test_32bit_matches_torch_optim(device, ours, theirs, kwargs):
    p_ours, p_theirs = _param(device), _param(device)
    grads = _grads(device, 100)
    _run(ours([p_ours], **kwargs), p_ours, grads)
    _run(theirs([p_theirs], **kwargs), p_theirs, grads)
    torch.testing.assert_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)


def test_lion_32bit_follows_the_published_rule(device):
    p = _param(device)
    reference, momentum = p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64)
    grads = _grads(device, 30)
    lr, beta1, beta2, wd = 1e-3, 0.9, 0.99, 0.1
    for g in grads:
        g = g.double()
        reference = reference * (1 - lr * wd) - lr * torch.sign(beta1 * momentum + (1 - beta1) * g)
        momentum = beta2 * momentum + (1 - beta2) * g
    _run(bnb.optim.Lion32bit([p], lr=lr, betas=(beta1, beta2), weight_decay=wd), p, grads)
    torch.testing.assert_close(p.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eight, thirty_two, kwargs", EIGHT_BIT, ids=lambda v: getattr(v, "__name__", ""))
def test_8bit_tracks_32bit(device, eight, thirty_two, kwargs):
    p8, p32 = _param(device), _param(device)
    grads = _grads(device, 50)
    opt8 = eight([p8], **kwargs)
    _run(opt8, p8, grads)
    _run(thirty_two([p32], **kwargs), p32, grads)
    state = opt8.state[p8]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
    moved = (p32 - _param(device)).norm()
    assert (p8 - p32).norm() <= 0.1 * moved


def test_8bit_state_layout_and_memory(device):
    p = _param(device, shape=(512, 512))
    opt = bnb.optim.AdamW8bit([p])
    _run(opt, p, _grads(device, 1, shape=(512, 512)))
    state = opt.state[p]
    assert state["state1"].shape == p.shape and state["state2"].dtype == torch.uint8
    assert state["absmax1"].shape == (512 * 512 // 256,) and state["absmax2"].shape == (1024,)
    assert torch.equal(state["qmap1"].cpu(), bnb.functional.create_dynamic_map(signed=True))
    assert torch.equal(state["qmap2"].cpu(), bnb.functional.create_dynamic_map(signed=False))
    per_param = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert per_param / p.numel() <= 2.04


def test_small_parameters_keep_32bit_state(device):
    small, large = _param(device, shape=(10, 10)), _param(device, shape=(64, 64))
    opt = bnb.optim.Adam8bit([small, large], min_8bit_size=4096)
    small.grad, large.grad = torch.ones_like(small), torch.ones_like(large)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.float32
    assert opt.state[large]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_parameters(device, dtype):
    p = torch.nn.Parameter(_param(device).detach().mul(0.1).to(dtype))  # small: 16-bit spacing << lr
    reference = torch.nn.Parameter(p.detach().float())
    start = reference.detach().clone()
    g = _grads(device, 1)[0]
    steady = (g.sign() * (0.05 + g.abs().clamp(max=0.05))).to(dtype)  # magnitudes in [0.05, 0.1]
    grads = [steady] * 20  # a steady gradient: every step moves p by about lr
    _run(bnb.optim.Adam8bit([p], lr=1e-2), p, grads)
    _run(bnb.optim.Adam32bit([reference], lr=1e-2), reference, [g.float() for g in grads])
    assert p.dtype == dtype
    assert (p.float() - reference).abs().max() < 0.02
    assert (p.float() - start).abs().mean() > 0.15


@pytest.mark.parametrize("cls", [bnb.optim.AdamW8bit, bnb.optim.AdEMAMix8bit, bnb.optim.Lion32bit])
def test_state_dict_resumes_bit_exactly(device, cls):
    p = _param(device)
    grads = _grads(device, 10)
    opt = cls([p], lr=1e-3)
    _run(opt, p, grads[:5])
    saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
    _run(opt, p, grads[5:])
    expected = p.detach().clone()

    q = torch.nn.Parameter(saved_p.clone())
    resumed = cls([q], lr=1e-3)
    resumed.load_state_dict(saved)
    _run(resumed, q, grads[5:])
    assert torch.equal(q, expected)
    state = saved["state"][0]
    assert isinstance(state["step"], int) and state["step"] == 5
    expected_keys = {"step", "state1", "absmax1", "qmap1"} if "8bit" in cls.__name__ else {"step", "state1"}
    assert expected_keys <= set(state)


def test_loads_nested_bitsandbytes_state_dict(device):
    p = _param(device)
    grads = _grads(device, 4)
    opt = bnb.optim.Adam8bit([p])
    _run(opt, p, grads[:2])
    saved = opt.state_dict()
    quant_names = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
    nested = {"step": saved["state"][0]["step"],
              "__bnb_optimizer_quant_state__": {k: saved["state"][0][k] for k in quant_names}}  # fmt: skip
    q = torch.nn.Parameter(p.detach().clone())
    resumed = bnb.optim.Adam8bit([q])
    resumed.load_state_dict({**saved, "state": {0: nested}})
    _run(opt, p, grads[2:])
    _run(resumed, q, grads[2:])
    assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_saved_state_loads_on_cuda():
    p = _param("cpu")
    opt = bnb.optim.AdamW8bit([p])
    _run(opt, p, _grads("cpu", 3))
    q = torch.nn.Parameter(p.detach().cuda())
    resumed = bnb.optim.AdamW8bit([q])
    resumed.load_state_dict(opt.state_dict())
    assert all(v.device.type == "cuda" for k, v in resumed.state[q].items() if k != "step")
    _run(resumed, q, _grads("cuda", 1))


def test_embeddings_keep_32bit_state_through_the_manager(device):
    embedding = bnb.nn.StableEmbedding(1000, 64, device=device)
    linear = torch.nn.Linear(64, 128, device=device)
    opt = bnb.optim.Adam8bit([*embedding.parameters(), *linear.parameters()])
    linear(embedding(torch.tensor([1, 2, 3], device=device))).sum().backward()
    opt.step()
    assert opt.state[embedding.weight]["state1"].dtype == torch.float32
    assert opt.state[linear.weight]["state1"].dtype == torch.uint8


def test_override_config(device):
    a, b = _param(device), _param(device, seed=3)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.override_config(b, "optim_bits", 32)
    opt = bnb.optim.Adam8bit([a, b])
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.uint8 and opt.state[b]["state1"].dtype == torch.float32


def test_compiled_step_does_not_recompile_when_lr_changes(device):
    torch._dynamo.reset()
    p, q = _param(device), _param(device)
    compiled_opt = bnb.optim.AdamW8bit([p], lr=torch.tensor(1e-3))
    eager_opt = bnb.optim.AdamW8bit([q], lr=torch.tensor(1e-3))
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm

    step = torch.compile(compiled_opt.step, backend=backend, fullgraph=True)
    for i, g in enumerate(_grads(device, 5)):
        p.grad, q.grad = g.clone(), g.clone()
        step()
        eager_opt.step()
        for opt in (compiled_opt, eager_opt):
            opt.param_groups[0]["lr"].fill_(1e-3 * 0.5**i)
    assert torch.equal(p, q)
    assert counts["frames"] <= 2  # the first step (which creates the states) and every later step


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: bnb.optim.Adam(ps, lr=-1.0), r"lr must be in \[0.0, inf\)"),
        (lambda ps: bnb.optim.Adam(ps, betas=(1.5, 0.9)), r"betas\[0\] must be in"),
        (lambda ps: bnb.optim.AdamW8bit(ps, amsgrad=True), "amsgrad"),
        (lambda ps: bnb.optim.Adam(ps, eps=-1e-8), "eps must be in"),
        (lambda ps: bnb.optim.Adam(ps, optim_bits=4), "optim_bits must be 8 or 32"),
        (lambda ps: bnb.optim.AdEMAMix(ps, betas=(0.9, 0.99)), "betas must be"),
        (lambda ps: bnb.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening must be 0"),
        (lambda ps: bnb.optim.LARS(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov must be False"),
        (lambda ps: bnb.optim.RMSprop8bit(ps, percentile_clipping=5), "percentile_clipping must be 100"),
        (lambda ps: bnb.optim.RMSprop(ps, centered=True), "centered must be False"),
        (lambda ps: bnb.optim.Adagrad(ps, lr_decay=0.1), "lr_decay must be 0"),
        (lambda ps: bnb.optim.LAMB(ps, amsgrad=True), "amsgrad must be False"),
        (lambda ps: bnb.optim.Lion(ps, block_wise=False), "block_wise must be True"),
        (lambda ps: bnb.optim.RMSprop(ps, alpha=1.5), r"alpha must be in \(0, 1\)"),
        (lambda ps: bnb.optim.LARS(ps, lr=0.1, momentum=1.5), r"momentum must be in \(0, 1\)"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make([_param("cpu")])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ps: bnb.optim.Adam(ps, betas=(0.9,)), ValueError, r"betas must be a tuple of 2 values"),
        (lambda ps: bnb.optim.Lion8bit(ps, betas=(0.9, 0.99, 0.5)), ValueError, r"betas must be a tuple of 2"),
        (lambda ps: bnb.optim.Adam8bit([{"params": ps, "lr": -1.0}]), ValueError, r"lr must be in"),
        (lambda ps: bnb.optim.Adam8bit([{"params": ps, "betas": (1.5, 2.0)}]), ValueError, r"betas\[0\] must be in"),
        (lambda ps: bnb.optim.Adam(ps, lr="1e-3"), TypeError, r"lr must be a number, got '1e-3'"),
        (lambda ps: bnb.optim.Adam(ps, eps=None), TypeError, r"eps must be a number"),
        (
            lambda ps: bnb.optim.AdEMAMix8bit(ps, betas=(0.0, 0.999, 0.9999), t_beta3=100),
            ValueError,
            r"t_beta3 interpolates .* both must be > 0, got 0.0 and 0.9999",
        ),
        (
            lambda ps: bnb.optim.Adam8bit([*ps, _param("cpu", torch.float64)]),
            TypeError,
            r"parameter 1 of group 0 has dtype",
        ),
        (lambda ps: bnb.optim.Adam8bit(ps, min_8bit_size=-1), ValueError, r"min_8bit_size must be in \[0, inf\)"),
        (lambda ps: bnb.optim.LAMB8bit(ps, max_unorm=-1.0), ValueError, r"max_unorm must be in \[0, inf\)"),
    ],
)
def test_bad_groups_and_parameters(make, error, match):
    """Every group is checked (constructor groups, per-group settings), and parameters the kernels cannot take."""
    with pytest.raises(error, match=match):
        make([_param("cpu")])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda st: st.pop("qmap1"), r"missing \['qmap1'\]"),
        (lambda st: st.pop("absmax1"), r"missing \['absmax1'\]"),
        (lambda st: st.pop("step"), r"missing \['step'\]"),
        (lambda st: st.update(state1=st["state1"][:100]), r"state1 of parameter 0 has shape \[100\]"),
    ],
    ids=["qmap1", "absmax1", "step", "shape"],
)
def test_load_state_dict_checks_the_saved_states_first(edit, match):
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = bnb.optim.Adam8bit([p])
    opt.step()
    saved = opt.state_dict()
    edit(saved["state"][0])
    q = torch.nn.Parameter(torch.randn(5000))
    target = bnb.optim.Adam8bit([q])
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saved)
    assert not target.state  # nothing loaded


def test_overrides_are_checked():
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    layer = torch.nn.Linear(4, 4)
    try:
        with pytest.raises(ValueError, match="optim_bits must be 8 or 32, got 4"):
            manager.override_config(layer.weight, "optim_bits", 4)
        with pytest.raises(ValueError, match="Linear has no parameter 'wieght'"):
            manager.register_module_override(layer, "wieght", {"optim_bits": 32})
        assert not manager.pid2config and not manager.module_weight_config_triple
    finally:
        manager.initialize()


def test_frozen_quantized_weights_may_be_passed():
    """As in QLoRA, where all of model.parameters() go to the optimizer: only trainable parameters are checked."""
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    opt = bnb.optim.AdamW8bit(layer.parameters())
    layer(torch.randn(2, 64)).sum().backward()
    bias = layer.bias.detach().clone()
    opt.step()
    assert not torch.equal(layer.bias, bias) and layer.weight.grad is None


def test_add_param_group_is_checked_and_leaves_the_groups_unchanged():
    opt = bnb.optim.Adam8bit([_param("cpu")])
    for group, error in (({"params": [_param("cpu")], "lr": -1.0}, ValueError),
                         ({"params": [_param("cpu", torch.float64)]}, TypeError)):  # fmt: skip
        with pytest.raises(error):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1


def test_sgd_without_momentum_is_refused():
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\), got 0"):
        bnb.optim.SGD8bit([_param("cpu")], lr=0.1)


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = bnb.optim.Adam32bit(embedding.parameters())
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_every_variant_is_an_optimizer8bit():
    names = [n for n in bnb.optim.__all__ if n != "GlobalOptimManager"]
    assert all(issubclass(getattr(bnb.optim, n), Optimizer8bit) for n in names)
    assert bnb.optim.PagedAdamW8bit([_param("cpu")]).is_paged


PAGED = [
    (bnb.optim.PagedAdamW8bit, bnb.optim.AdamW8bit),
    (bnb.optim.PagedAdam32bit, bnb.optim.Adam32bit),
    (bnb.optim.PagedLion8bit, bnb.optim.Lion8bit),
    (bnb.optim.PagedAdEMAMix8bit, bnb.optim.AdEMAMix8bit),
]


@pytest.mark.parametrize("paged, plain", PAGED, ids=lambda v: v.__name__)
def test_paged_steps_equal_unpaged(device, paged, plain):
    p_paged, p_plain = _param(device, shape=(256, 80)), _param(device, shape=(256, 80))
    grads = _grads(device, 5, shape=(256, 80))
    opt_paged, opt_plain = paged([p_paged], lr=1e-3), plain([p_plain], lr=1e-3)
    _run(opt_paged, p_paged, grads)
    _run(opt_plain, p_plain, grads)
    assert torch.equal(p_paged, p_plain)
    for name, value in opt_plain.state[p_plain].items():
        assert torch.equal(opt_paged.state[p_paged][name], value), name


@pytest.mark.skipif(not bnb.ops.CUDA_EXTENSION_LOADED, reason="needs the CUDA extension (managed memory)")
def test_paged_states_live_in_managed_memory_and_survive_a_reload():
    p = _param("cuda", shape=(1024, 1024))
    p.grad = torch.ones_like(p)
    optimizer = bnb.optim.PagedAdamW8bit([p])
    before = torch.cuda.memory_allocated()
    optimizer.step()
    # the two 1 MiB uint8 states live outside PyTorch's caching allocator; only the absmax (32 KiB) is inside
    assert torch.cuda.memory_allocated() - before < p.numel() // 2
    reloaded = bnb.optim.PagedAdamW8bit([p])
    before = torch.cuda.memory_allocated()
    reloaded.load_state_dict(optimizer.state_dict())
    assert all(torch.equal(reloaded.state[p][k], v) for k, v in optimizer.state[p].items() if k != "step")
    reloaded.step()
    assert torch.cuda.memory_allocated() - before < p.numel() // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_states_never_exceed_free_memory(monkeypatch):
    p = _param("cuda", shape=(1024, 1024))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    optimizer = bnb.optim.PagedAdamW32bit([p])
    p.grad = torch.ones_like(p)
    with pytest.raises(torch.OutOfMemoryError, match="free"):
        optimizer.step()


class _OpCalls(TorchDispatchMode):
    """Records the lowbit ops called (name, number of parameters) while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lowbit":
            self.calls.append((func.__name__.split(".")[0], len(args[1]) if isinstance(args[1], list) else 1))
        return func(*args, **(kwargs or {}))


def test_step_issues_one_grouped_op_per_unit():
    big = [_param("cpu", seed=seed) for seed in range(3)]  # 8-bit states
    small = [_param("cpu", shape=(10, 8), seed=seed) for seed in (4, 5)]  # 32-bit states (under min_8bit_size)
    half = _param("cpu", dtype=torch.bfloat16, seed=6)
    other = _param("cpu", seed=7)
    opt = bnb.optim.AdamW8bit([{"params": [*big, half, *small]}, {"params": [other], "lr": 1e-2}])
    for _ in range(2):  # the first step creates the states, the second reuses the grouping
        for p in (*big, *small, half, other):
            p.grad = torch.ones_like(p)
        with _OpCalls() as mode:
            opt.step()
        assert sorted(mode.calls) == [
            ("optimizer_update_32bit_grouped", 2),
            ("optimizer_update_8bit_blockwise_grouped", 1),  # the bf16 parameter
            ("optimizer_update_8bit_blockwise_grouped", 1),  # the second param group
            ("optimizer_update_8bit_blockwise_grouped", 3),
        ]


def _each_alone(make, params, grads_at):
    """Each parameter stepped by an optimizer of its own, on the steps it has a gradient."""
    for p in params:
        opt = make([p])
        for grads in grads_at:
            if grads.get(id(p)) is not None:
                p.grad = grads[id(p)].clone()
                opt.step()


GROUPED = [
    lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, min_8bit_size=1000),
    lambda ps: bnb.optim.AdEMAMix8bit(ps, lr=1e-3, t_alpha=10, t_beta3=10, min_8bit_size=1000),
    lambda ps: bnb.optim.Lion32bit(ps, lr=1e-4),
    lambda ps: bnb.optim.SGD8bit(ps, lr=1e-2, momentum=0.9, min_8bit_size=1000),
]


@pytest.mark.parametrize("make", GROUPED, ids=["AdamW8bit", "AdEMAMix8bit", "Lion32bit", "SGD8bit"])
def test_grouped_step_equals_stepping_each_parameter_alone(device, make):
    shapes = [(64, 80), (33, 47), (40, 30), (1111,), (20, 10)]  # the last under min_8bit_size
    together = [_param(device, shape=shape, seed=seed) for seed, shape in enumerate(shapes)]
    alone = [_param(device, shape=shape, seed=seed) for seed, shape in enumerate(shapes)]
    # a parameter without gradients at first, one that misses a step: their step counts differ from the others'
    grads_at = []
    for step in range(6):
        grads = {}
        for index, p in enumerate(together):
            if (index == 2 and step < 2) or (index == 3 and step == 4):
                continue
            grads[index] = _grads(device, 1, shape=p.shape, seed=10 * step + index)[0]
        grads_at.append(grads)
    opt = make(together)
    for grads in grads_at:
        for index, p in enumerate(together):
            p.grad = grads.get(index)
        opt.step()
    _each_alone(make, alone, [{id(alone[i]): g for i, g in grads.items()} for grads in grads_at])
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a, b)


def test_override_after_a_step_regroups(device):
    manager = bnb.optim.GlobalOptimManager.get_instance()
    a, b = _param(device), _param(device, seed=3)
    opt = bnb.optim.AdamW8bit([a, b], lr=1e-3)
    try:
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
        manager.override_config(b, "lr", 0.0)
        before = a.detach().clone(), b.detach().clone()
        opt.step()
        assert not torch.equal(a, before[0]) and torch.equal(b, before[1])
    finally:
        manager.initialize()


def test_loaded_custom_maps_get_a_unit_of_their_own(device):
    ps = [_param(device, seed=seed) for seed in range(3)]
    opt = bnb.optim.Adam8bit(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][1]["qmap1"] = saved["state"][1]["qmap1"] * 0.5  # still sorted: another valid map
    resumed, singles = (
        [_param(device, seed=seed) for seed in range(3)],
        [_param(device, seed=seed) for seed in range(3)],
    )
    opt = bnb.optim.Adam8bit(resumed)
    opt.load_state_dict(saved)
    for index, p in enumerate(singles):  # each alone, from its saved state
        alone = bnb.optim.Adam8bit([p])
        group = {**saved["param_groups"][0], "params": [0]}
        alone.load_state_dict({"state": {0: saved["state"][index]}, "param_groups": [group]})
        p.grad = torch.full_like(p, 0.5)
        alone.step()
    for p in resumed:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    for a, b in zip(resumed, singles, strict=True):
        assert torch.equal(a, b)


def test_override_config_is_forgotten_with_its_tensor():
    """A later tensor that reuses a freed tensor's id must not inherit its overrides."""
    manager = bnb.optim.GlobalOptimManager.get_instance()
    p = _param("cpu")
    pid = id(p)
    manager.override_config(p, "optim_bits", 32)
    assert manager.pid2config[pid] == {"optim_bits": 32}
    del p
    assert pid not in manager.pid2config


def test_cleared_or_replaced_state_is_used_by_the_next_step(device):
    """The cached grouping must follow the states the user sees: a cleared state starts again, a replaced
    step count is the one that advances."""
    p = _param(device)
    opt = bnb.optim.AdamW8bit([p])
    for g in _grads(device, 2):
        p.grad = g
        opt.step()
    opt.state.clear()
    p.grad = _grads(device, 1, seed=5)[0]
    opt.step()
    assert opt.state[p]["step"].item() == 1
    opt.state[p]["step"] = torch.tensor(10.0)
    opt.step()
    assert opt.state[p]["step"].item() == 11


def test_sparse_gradients_are_refused_after_dense_steps():
    embedding = torch.nn.Embedding(10, 4)
    opt = bnb.optim.Adam32bit(embedding.parameters())
    embedding(torch.tensor([1])).sum().backward()
    opt.step()
    embedding.weight.grad = embedding.weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_maps_replaced_in_the_state_are_used():
    """A parameter whose state gets other maps is updated with them, not with its unit's first parameter's."""
    a, b = _param("cpu", seed=1), _param("cpu", seed=2)
    opt = bnb.optim.Adam8bit([a, b])
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    signed = opt.state[b]["qmap1"]
    opt.state[b]["qmap1"] = signed.flip(0).contiguous()  # the same values in another order: other codes
    b_alone = b.detach().clone().requires_grad_(True)
    alone = bnb.optim.Adam8bit([b_alone])
    b_alone.grad = b.grad
    alone.step()
    alone.state[b_alone]["qmap1"] = opt.state[b]["qmap1"]
    for name in ("state1", "state2", "absmax1", "absmax2"):
        alone.state[b_alone][name] = opt.state[b][name].clone()
    opt.step()
    alone.step()
    assert torch.equal(opt.state[b]["state1"], alone.state[b_alone]["state1"])


def test_initialize_detaches_the_override_finalizers():
    manager = bnb.optim.GlobalOptimManager.get_instance()
    p = _param("cpu")
    manager.override_config(p, "optim_bits", 32)
    manager.initialize()
    manager.override_config(p, "optim_bits", 32)
    assert len([f for f in manager._finalizers.values() if f.alive]) == 1
    pid = id(p)
    del p
    assert pid not in manager.pid2config and pid not in manager._finalizers
