"""Decode (m = 1) through a Llama-shaped MLP-and-projections block: eager vs torch.compile vs CUDA graphs.

The block is RMSNorm -> qkv -> o -> RMSNorm -> gate_up -> SiLU-gated -> down, dim 4096, hidden 14336, every
projection a ``Linear4bit`` (NF4, nested absmax, bf16 compute), against the same block of bf16 ``nn.Linear``.
Times are in ms per block call, medians of CUDA-event timings: of single calls waited for one by one (the host's
dispatch included: what one decode step costs) and of 20 calls issued back to back (host work overlaps the
device's, as in a decode loop).

    python benchmarks/bench_decode.py [--reps 50] [--out results/decode_h200.md] [--profile]

--profile also prints, per weights and mode, the device kernels of 20 calls (torch.profiler) and the host time.
"""

import argparse

import torch
from timing import back_to_back_ms, emit, time_ms
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


def _profile(name: str, fn, x: torch.Tensor) -> None:
    """Print the device kernels of 20 calls of ``fn`` (self device time, calls) and the host time of the loop."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
    print(f"--- {name}: 20 calls")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))


def _times(fn, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(ms of a single call waited for, ms per call of 20 calls issued back to back)."""
    single = time_ms(fn, ((x,),), reps=reps)
    back_to_back = back_to_back_ms(lambda: fn(x), reps)
    return single, back_to_back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--out")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    x = torch.randn(1, 1, args.dim, device="cuda", dtype=torch.bfloat16)
    lines = [
        f"Decode, m = 1, dim {args.dim}, hidden {args.hidden}, bf16 activations, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}; ms per block call (medians).",
        "",
        "| weights | mode | single call ms | back-to-back ms | vs eager (single) | vs eager (back-to-back) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, quantized in (("bf16", False), ("nf4", True)):
        torch.manual_seed(0)
        with torch.device("cuda"):
            block = DecodeBlock(args.dim, args.hidden, _linear(quantized)).to(torch.bfloat16).eval()
        with torch.no_grad():
            eager = block(x)
            times = {"eager": _times(block, x, args.reps)}
            if args.profile:
                _profile(f"{name} eager", block, x)
            for mode in ("default", "reduce-overhead"):
                compiled = torch.compile(block, mode=mode, fullgraph=True)
                torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)
                times[mode] = _times(compiled, x, args.reps)
                if args.profile:
                    _profile(f"{name} {mode}", compiled, x)
        base = times["eager"]
        for mode, (single, back) in times.items():
            lines.append(
                f"| {name} | {mode} | {single:.4f} | {back:.4f} | {base[0] / single:.2f}x | {base[1] / back:.2f}x |"
            )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
