"""A small Llama-shaped model for QLoRA tests and benchmarks: a frozen base (4-bit or float linears, embeddings,
norms) with float32 LoRA adapters, the only trainable parameters (FSDP2 wants one dtype among those)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchlowbit as bnb


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with a frozen ``base`` and trainable rank-``rank`` adapters (B starts at 0)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype))).to(x.dtype) * self.scale


def _linear(i: int, o: int, quantized: bool, dtype: torch.dtype) -> nn.Module:
    if quantized:
        base = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=dtype, quant_type="nf4", quant_storage=dtype)
    else:
        base = nn.Linear(i, o, bias=False, dtype=dtype).requires_grad_(False)
    return LoRALinear(base)


class Block(nn.Module):
    """Pre-norm attention (causal, multi-head) and SwiGLU MLP, every projection a LoRA-adapted frozen linear."""

    def __init__(self, dim: int, heads: int, hidden: int, quantized: bool, dtype: torch.dtype, ac: bool) -> None:
        super().__init__()
        self.heads, self.ac = heads, ac
        self.attn_norm = nn.RMSNorm(dim, dtype=dtype).requires_grad_(False)
        self.mlp_norm = nn.RMSNorm(dim, dtype=dtype).requires_grad_(False)
        self.qkv = _linear(dim, 3 * dim, quantized, dtype)
        self.out = _linear(dim, dim, quantized, dtype)
        self.gate_up = _linear(dim, 2 * hidden, quantized, dtype)
        self.down = _linear(hidden, dim, quantized, dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(attn)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, use_reentrant=False) if self.ac else self._forward(x)


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, hidden: int = 128,
                 quantized: bool = True, dtype: torch.dtype = torch.float32, ac: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, dtype=dtype).requires_grad_(False)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, quantized, dtype, ac) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, dtype=dtype).requires_grad_(False)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=dtype).requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).float()


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
