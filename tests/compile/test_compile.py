"""torch.compile (fullgraph, training, dynamic shapes), torch.export and AOTInductor of the quantized modules."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchlowbit as bnb


class Block(nn.Module):
    """A small transformer-style block built from the quantized modules."""

    def __init__(self, dim=64, vocab=100, linear=None):
        super().__init__()
        self.embed = bnb.nn.EmbeddingNF4(vocab, dim)
        self.qkv = bnb.nn.Linear4bit(dim, 3 * dim, quant_type="nf4")
        self.proj = bnb.nn.LinearFP4(dim, dim, compress_statistics=False, quant_storage=torch.bfloat16)
        self.up = bnb.nn.Linear8bitLt(dim, 4 * dim, has_fp16_weights=False, threshold=6.0)
        self.down = bnb.nn.Linear8bitLt(4 * dim, dim, has_fp16_weights=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + self.proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        return h + self.down(nn.functional.gelu(self.up(h)))


def _block(device):
    torch.manual_seed(0)
    return Block().to(device).eval()


def _tokens(device, batch=2, seq=8):
    return torch.randint(0, 100, (batch, seq), device=device)


LAYERS = {
    "nf4-nested": lambda: bnb.nn.Linear4bit(64, 32, quant_type="nf4"),
    "fp4-plain-bf16storage": lambda: bnb.nn.Linear4bit(64, 32, quant_type="fp4", compress_statistics=False,
                                                       quant_storage=torch.bfloat16),
    "int8-t0": lambda: bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False),
    "int8-t6": lambda: bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0),
    "int8-fp16-weights": lambda: bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYERS))
def test_fullgraph_inference_has_no_graph_breaks(device, name):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(device)
    x = torch.randn(3, 5, 64, device=device)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_block_compiles_fullgraph(device):
    block = _block(device)
    tokens = _tokens(device)
    assert torch._dynamo.explain(block)(tokens).graph_break_count == 0
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(tokens), block(tokens), rtol=1e-5, atol=1e-5)


class QLoRA(nn.Module):
    """A frozen NF4 base with a trainable low-rank adapter."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_qlora_training_matches_eager(device, checkpointed):
    torch.manual_seed(0)
    model = QLoRA(bnb.nn.Linear4bit(64, 32, quant_type="nf4")).to(device)

    def loss_fn(m, x):
        out = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False) if checkpointed else m(x)
        return out.square().mean()

    x = torch.randn(6, 64, device=device, requires_grad=True)
    eager = loss_fn(model, x)
    eager.backward()
    expected = [p.grad.clone() for p in (model.lora_a.weight, model.lora_b.weight)] + [x.grad.clone()]
    for p in (model.lora_a.weight, model.lora_b.weight, x):
        p.grad = None
    compiled = torch.compile(loss_fn, fullgraph=True)(model, x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for got, want in zip([model.lora_a.weight.grad, model.lora_b.weight.grad, x.grad], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.base.weight.grad is None


def test_compiled_int8_training_matches_eager(device):
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True, threshold=3.0).to(device)
    x = torch.randn(6, 64, device=device)
    layer(x).square().mean().backward()
    expected = (layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    torch.compile(lambda m, x: m(x).square().mean(), fullgraph=True)(layer, x).backward()
    torch.testing.assert_close((layer.weight.grad, layer.bias.grad), expected, rtol=1e-4, atol=1e-5)


def test_dynamic_shapes_compile_once(device):
    block = _block(device)
    frames = {"count": 0}

    def backend(gm, example_inputs):
        frames["count"] += 1
        return gm

    compiled = torch.compile(block, backend=backend, dynamic=True, fullgraph=True)
    for batch, seq in [(2, 8), (3, 5), (5, 17), (4, 9)]:  # sizes >= 2: torch specializes 0 and 1
        tokens = _tokens(device, batch, seq)
        torch.testing.assert_close(compiled(tokens), block(tokens), rtol=1e-5, atol=1e-5)
    assert frames["count"] == 1


def _lowbit_calls(program) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "lowbit" in str(n.target)}


@pytest.mark.parametrize("strict", [False, True])
def test_export_calls_the_lowbit_ops(device, strict):
    block = _block(device)
    tokens = _tokens(device)
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(block, (tokens,), dynamic_shapes=({0: batch},), strict=strict)
    assert {"lowbit.gemm_4bit.default", "lowbit.int8_mixed_linear.default", "lowbit.dequantize_4bit.default"} <= (
        _lowbit_calls(program)
    )
    other = _tokens(device, batch=5)
    torch.testing.assert_close(program.module()(other), block(other), rtol=1e-5, atol=1e-5)


def test_exported_program_runs_in_a_fresh_process(tmp_path, device):
    block = _block(device)
    tokens = _tokens(device)
    program = torch.export.export(block, (tokens,))
    torch.export.save(program, tmp_path / "block.pt2")
    torch.save({"tokens": tokens.cpu(), "expected": block(tokens).cpu()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import torchlowbit  # noqa: F401  (the only import the program needs)
        program = torch.export.load({str(tmp_path / "block.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = program.module()(io["tokens"].to({device!r})).cpu()
        torch.testing.assert_close(out, io["expected"], rtol=1e-5, atol=1e-5)
        print("fresh process ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fresh process ok" in result.stdout


_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def test_aot_inductor_package(tmp_path, device):
    if _TORCH_VERSION < (2, 13):
        # On the GPU machine (torch 2.11+cu130) aoti_load_package segfaults in AOTIModelPackageLoader for every
        # package, a plain nn.Linear + GELU without torchlowbit imported included: CUDA packages since the first
        # check, CPU packages too when checked again (2026-11-21, fifth session). CI (torch 2.13, CPU) runs it.
        pytest.skip("AOTInductor packages segfault on load in torch 2.11 on the GPU machine, torchlowbit or not")
    torch.manual_seed(0)
    layers = (bnb.nn.Linear4bit(64, 128, quant_type="nf4"), nn.GELU(),
              bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0))  # fmt: skip
    model = nn.Sequential(*layers).to(device).eval()
    x = torch.randn(4, 64, device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    other = torch.randn(9, 64, device=device)
    torch.testing.assert_close(runner(other), model(other), rtol=1e-5, atol=1e-5)


def test_traces_under_fake_tensor_mode_and_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    block = _block("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = block(mode.from_tensor(_tokens("cpu")))
    assert out.shape == (2, 8, 64)
    with torch.device("meta"):
        meta_block = Block()
    assert meta_block(_tokens("meta")).shape == (2, 8, 64)


def _assert_traced_errors(how: str, cases) -> None:
    """Compiling (fullgraph) or exporting each (module, input, message) raises an error matching the message."""
    for module, x, message in cases:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            if how == "compile":
                torch.compile(module, fullgraph=True)(x)
            else:
                torch.export.export(module, (x,), strict=how == "export-strict")


@pytest.mark.parametrize("how", ["compile", "export-strict", "export-non-strict"])
def test_compiling_or_exporting_an_unquantized_weight_names_the_module(how):
    linear = bnb.nn.Linear4bit(64, 32)
    linear.weight = nn.Parameter(torch.randn(32, 64), requires_grad=False)
    embedding = bnb.nn.EmbeddingNF4(100, 64)
    embedding.weight = nn.Parameter(torch.randn(100, 64), requires_grad=False)
    linear_message = (r"Linear4bit\.weight must be a Params4bit \(a quantized weight\), got an unquantized "
                      r"torch\.float32 tensor of shape \[32, 64\]")  # fmt: skip
    embedding_message = r"EmbeddingNF4\.weight must be a Params4bit .* shape \[100, 64\]"
    embedding8 = bnb.nn.Embedding8bit(100, 64)
    embedding8.weight = nn.Parameter(torch.randn(100, 64), requires_grad=False)
    embedding8_message = r"Embedding8bit\.weight must be an Int8Params \(a quantized weight\), got an unquantized"
    cases = ((linear, torch.randn(2, 64), linear_message), (embedding, _tokens("cpu"), embedding_message),
             (embedding8, _tokens("cpu"), embedding8_message))  # fmt: skip
    _assert_traced_errors(how, cases)


def _with_inner(weight, name, fn):
    """``weight`` rebuilt (through the subclass protocol) with its inner tensor ``name`` replaced by ``fn(it)``."""
    names, meta = weight.__tensor_flatten__()
    inner = {n: getattr(weight, n) for n in names}
    inner[name] = fn(inner[name])
    return type(weight).__tensor_unflatten__(inner, meta, None, None)


@pytest.mark.parametrize("how", ["compile", "export-strict", "export-non-strict"])
def test_compiling_or_exporting_an_inconsistent_quant_state_names_the_module(how):
    torch.manual_seed(0)
    linear4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    linear4.weight = nn.Parameter(_with_inner(linear4.weight, "absmax", lambda t: t[:-1]), requires_grad=False)
    linear8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    linear8.weight = nn.Parameter(_with_inner(linear8.weight, "SCB", lambda t: t[:-1]), requires_grad=False)
    embedding = bnb.nn.EmbeddingNF4(100, 64)
    embedding.weight = nn.Parameter(_with_inner(embedding.weight, "packed", lambda t: t[:-1]), requires_grad=False)
    cases = ((linear4, torch.randn(2, 64), r"Linear4bit\.weight\.absmax must have 32 elements \(one per block of 64\)"),
             (linear8, torch.randn(2, 64), r"Linear8bitLt\.weight\.SCB must have shape \(32,\)"),
             (embedding, _tokens("cpu"), r"EmbeddingNF4\.weight\.packed must hold 3200 bytes"))  # fmt: skip
    _assert_traced_errors(how, cases)


_HASH_SCRIPT = """
import torch, torchlowbit as bnb
torch.manual_seed({seed})
print(bnb.nn.Linear4bit(64, 32, quant_type="nf4").weight._stable_hash_for_caching())
print(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).weight._stable_hash_for_caching())
"""


def test_stable_hash_for_caching_is_the_same_across_processes_and_layout_only():
    def hashes(seed: int) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT.format(seed=seed)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    first = hashes(0)
    assert first == hashes(1)  # other weights, same layout: the same key (the data is not hashed)
    torch.manual_seed(0)
    assert bnb.nn.Linear4bit(64, 32, quant_type="nf4").weight._stable_hash_for_caching() == first[0]
    other = bnb.nn.Linear4bit(64, 32, quant_type="fp4").weight._stable_hash_for_caching()
    assert other != first[0]


@pytest.mark.skipif(
    not bnb.ops.CUDA_EXTENSION_LOADED, reason="needs the CUDA extension (some reference kernels synchronize)"
)
def test_reduce_overhead_cuda_graphs_match_eager():
    block = _block("cuda")
    tokens = _tokens("cuda")
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            out = compiled(tokens)
        torch.testing.assert_close(out, block(tokens), rtol=1e-5, atol=1e-5)
