"""Decode (m = 1) through a Llama-shaped MLP-and-projections block: eager vs torch.compile vs CUDA graphs.

The block is RMSNorm -> qkv -> o -> RMSNorm -> gate_up -> SiLU-gated -> down, dim 4096, hidden 14336, every
projection a ``Linear4bit`` (NF4, nested absmax, bf16 compute), against the same block of bf16 ``nn.Linear``.
Times are medians of CUDA-event timings of single calls (Python dispatch included), in ms.

    python benchmarks/bench_decode.py [--reps 50] [--out results/decode_h200.md]
"""

import argparse

import torch
from timing import emit, time_ms
from torch import nn

import torchlowbit as bnb


class DecodeBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, linear) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.o = linear(dim, 3 * dim), linear(dim, dim)
        self.gate_up, self.down = linear(dim, 2 * hidden), linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.o(q * torch.sigmoid(k) + v)  # stands in for attention over one token
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(nn.functional.silu(gate) * up)


def _linear(quantized: bool):
    if quantized:
        return lambda i, o: bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    return lambda i, o: nn.Linear(i, o, bias=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--out")
    args = parser.parse_args()
    x = torch.randn(1, 1, args.dim, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, quantized in (("bf16", False), ("nf4", True)):
        torch.manual_seed(0)
        with torch.device("cuda"):
            block = DecodeBlock(args.dim, args.hidden, _linear(quantized)).to(torch.bfloat16).eval()
        with torch.no_grad():
            eager = block(x)
            times = {"eager": time_ms(block, ((x,),), reps=args.reps)}
            for mode in ("default", "reduce-overhead"):
                compiled = torch.compile(block, mode=mode, fullgraph=True)
                torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)
                times[mode] = time_ms(compiled, ((x,),), reps=args.reps)
        rows.append((name, times))
    eager_bf16 = rows[0][1]["eager"]
    lines = [
        f"Decode, m = 1, dim {args.dim}, hidden {args.hidden}, bf16 activations, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}; ms per block call (median of {args.reps}).",
        "",
        "| weights | eager ms | compiled ms | reduce-overhead ms | compiled vs eager | CUDA graphs vs eager | "
        "vs bf16 eager (CUDA graphs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in rows:
        lines.append(
            f"| {name} | {t['eager']:.4f} | {t['default']:.4f} | {t['reduce-overhead']:.4f} | "
            f"{t['eager'] / t['default']:.2f}x | {t['eager'] / t['reduce-overhead']:.2f}x | "
            f"{eager_bf16 / t['reduce-overhead']:.2f}x |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
