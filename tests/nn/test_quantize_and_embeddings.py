"""torchlowbit.quantize_ and the embedding modules."""

import copy

import pytest
import torch
from torch import nn

import torchlowbit as bnb


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        return self.lm_head(self.mlp(self.attn(x)))


@pytest.mark.parametrize("quant_type, expected", [("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit),
                                                  ("int8", bnb.nn.Linear8bitLt)])  # fmt: skip
def test_quantize_swaps_every_linear_but_the_skipped(device, quant_type, expected):
    torch.manual_seed(0)
    model = _Block().to(device)
    x = torch.randn(3, 64, device=device)
    reference = model(x)
    quantized = bnb.quantize_(copy.deepcopy(model), quant_type, skip_modules=("lm_head",))
    assert type(quantized.lm_head) is nn.Linear
    for layer in (quantized.attn, quantized.mlp[0], quantized.mlp[2]):
        assert type(layer) is expected and layer.weight.device.type == device
    assert quantized.mlp[2].bias is None
    error = (quantized(x) - reference).norm() / reference.norm()
    assert error < {"nf4": 0.15, "fp4": 0.2, "int8": 0.02}[quant_type]  # three stacked layers


def test_quantize_on_meta_then_load(device):
    source = bnb.quantize_(_Block().to(device), "nf4")
    with torch.device("meta"):
        empty = _Block()
    bnb.quantize_(empty, "nf4")
    assert empty.attn.weight.is_meta
    empty.load_state_dict(source.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 64, device=device)
    assert torch.equal(empty(x), source(x))


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        bnb.quantize_(_Block(), "int4")
    with pytest.raises(ValueError, match="wrap a bare nn.Linear"):
        bnb.quantize_(nn.Linear(4, 4), "nf4")


def test_quantize_progress_bar(capsys):
    bnb.quantize_(_Block(), "nf4", progress=True)
    assert "4/4 lm_head" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [bnb.nn.Embedding, bnb.nn.StableEmbedding])
def test_float_embeddings_keep_32bit_optimizer_state(device, cls):
    embedding = cls(50, 16, device=device)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    assert (embedding, "weight", {"optim_bits": 32}) in manager.module_weight_config_triple
    out = embedding(torch.tensor([[1, 2], [3, 4]], device=device))
    assert out.shape == (2, 2, 16) and out.dtype == embedding.weight.dtype
    if cls is bnb.nn.StableEmbedding:
        torch.testing.assert_close(out.mean(-1), torch.zeros(2, 2, device=device), atol=1e-5, rtol=0)


def test_embedding8bit_matches_dequantized_table(device):
    embedding = bnb.nn.Embedding8bit(100, 32, device=device)
    index = torch.randint(0, 100, (4, 7), device=device)
    expected = nn.functional.embedding(index, embedding.weight.dequantize())
    assert torch.equal(embedding(index), expected)


@pytest.mark.parametrize("cls", [bnb.nn.EmbeddingNF4, bnb.nn.EmbeddingFP4])
@pytest.mark.parametrize("dim", [128, 100])  # whole blocks per row, and not
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_embedding4bit_matches_dequantized_table(device, cls, dim, storage):
    embedding = cls(60, dim, dtype=torch.bfloat16, quant_storage=storage, device=device)
    index = torch.randint(0, 60, (3, 5), device=device)
    expected = nn.functional.embedding(index, embedding.weight.dequantize())
    out = embedding(index)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
