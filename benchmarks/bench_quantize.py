"""Speed of the blockwise quantization kernels on CUDA: torchlowbit's csrc kernels, the PyTorch reference
kernels run on the same CUDA tensors, and bitsandbytes where it is importable.

Times are medians of CUDA-event timings after warm-up: torchlowbit (and bitsandbytes) from CUDA-graph replays of
several calls, device time without the launch latency that an event pair around one eager call adds (--eager
times those instead); the PyTorch reference from eager calls. Inputs smaller than 4x the L2 cache rotate among
copies so that every call reads from device memory. Bandwidth counts the bytes each op must move (inputs
read once, outputs written once) against a device-to-device copy measured in the same run.

    python benchmarks/bench_quantize.py [--reps 50] [--eager] [--no-reference] [--json out.json]
"""

import argparse
import json
import math

import torch
from timing import copies_for, copy_bandwidth, fill_bandwidth, time_cases, time_ms

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit import codebooks
from torchlowbit.ops import CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS
from torchlowbit.ops.registry import REFERENCE_KERNELS

try:  # optional side-by-side
    import bitsandbytes  # noqa: F401
    import bitsandbytes.functional as bnbf
except Exception:  # noqa: BLE001
    bnbf = None

SHAPES = [(15360, 15360), (4096, 4096)]  # 235.9M elements (as DESIGN.md's anchor), one 4096x4096 weight
BLOCKSIZE_4BIT = 64
BLOCKSIZE_8BIT = 4096


def cases(shape):
    """(name, bytes moved, build inputs -> list of arg tuples, lowbit fn, reference fn, bnb fn)."""
    numel = math.prod(shape)
    nb4 = math.ceil(numel / BLOCKSIZE_4BIT)
    nb8 = math.ceil(numel / BLOCKSIZE_8BIT)
    code = codebooks.create_dynamic_map().cuda()
    ops = torch.ops.lowbit

    def weight():
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def q4_inputs(n):
        return [(weight(),) for _ in range(n)]

    def dq4_inputs(n, nested=False):
        out = []
        for _ in range(n):
            packed, absmax = ops.quantize_4bit(weight(), BLOCKSIZE_4BIT, "nf4", torch.uint8)
            if nested:
                offset = absmax.mean().reshape(1)
                qabsmax, nested_absmax = ops.quantize_blockwise(absmax - offset, code, 256)
                out.append((packed, qabsmax, nested_absmax, offset))
            else:
                out.append((packed, absmax))
        return out

    def q8_inputs(n):
        return [(weight(),) for _ in range(n)]

    def dq8_inputs(n):
        return [ops.quantize_blockwise(weight(), code, BLOCKSIZE_8BIT) for _ in range(n)]

    ref = REFERENCE_KERNELS
    bf16 = torch.bfloat16
    yield (
        "quantize_4bit nf4",
        numel * 2 + numel // 2 + nb4 * 4,
        q4_inputs,
        lambda A: ops.quantize_4bit(A, BLOCKSIZE_4BIT, "nf4", torch.uint8),
        lambda A: ref["quantize_4bit"](A, BLOCKSIZE_4BIT, "nf4", torch.uint8),
        (lambda A: bnbf.quantize_4bit(A, blocksize=BLOCKSIZE_4BIT, quant_type="nf4")) if bnbf else None,
    )
    yield (
        "dequantize_4bit nf4",
        numel // 2 + nb4 * 4 + numel * 2,
        dq4_inputs,
        lambda p, a: ops.dequantize_4bit(p, a, BLOCKSIZE_4BIT, "nf4", shape, bf16),
        lambda p, a: ref["dequantize_4bit"](p, a, BLOCKSIZE_4BIT, "nf4", shape, bf16),
        None,
    )
    yield (
        "dequantize_4bit nf4 nested",
        numel // 2 + nb4 + math.ceil(nb4 / 256) * 4 + numel * 2,
        lambda n: dq4_inputs(n, nested=True),
        lambda p, q, s, o: ops.dequantize_4bit(p, q, BLOCKSIZE_4BIT, "nf4", shape, bf16, s, code, o, 256),
        lambda p, q, s, o: ref["dequantize_4bit"](p, q, BLOCKSIZE_4BIT, "nf4", shape, bf16, s, code, o, 256),
        None,
    )
    yield (
        "quantize_blockwise",
        numel * 2 + numel + nb8 * 4,
        q8_inputs,
        lambda A: ops.quantize_blockwise(A, code, BLOCKSIZE_8BIT),
        lambda A: ref["quantize_blockwise"](A, code, BLOCKSIZE_8BIT),
        (lambda A: bnbf.quantize_blockwise(A, code=code, blocksize=BLOCKSIZE_8BIT)) if bnbf else None,
    )
    yield (
        "dequantize_blockwise",
        numel + nb8 * 4 + numel * 2,
        dq8_inputs,
        lambda q, a: ops.dequantize_blockwise(q, a, code, BLOCKSIZE_8BIT, bf16),
        lambda q, a: ref["dequantize_blockwise"](q, a, code, BLOCKSIZE_8BIT, bf16),
        None,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--reference-reps", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="time single eager calls instead of graph replays")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference kernels")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quantize needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, extension: {CUDA_EXTENSION_STATUS}")
    if CUDA_REFERENCE_OPS:
        print(f"ops running the reference kernel on CUDA: {CUDA_REFERENCE_OPS}")
    copy_tbps, fill_tbps = copy_bandwidth(args.reps), fill_bandwidth(args.reps)
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write); fill: {fill_tbps:.2f} TB/s (write only)")

    rows = []
    for shape in SHAPES:
        numel = math.prod(shape)
        for name, nbytes, build, fn, ref_fn, bnb_fn in cases(shape):
            inputs = build(copies_for(numel * 2))
            ms = time_cases({"lowbit": (fn, inputs)}, args.reps, args.eager)["lowbit"]
            row = dict(op=name, shape=list(shape), ms=ms, gb=nbytes / 1e9, tbps=nbytes / ms / 1e9)
            row["copy_fraction"] = row["tbps"] / copy_tbps
            if not args.no_reference:
                row["reference_ms"] = time_ms(ref_fn, inputs[:1], args.reference_reps, warmup=1)
            if bnb_fn is not None:
                row["bnb_ms"] = time_cases({"bnb": (bnb_fn, inputs)}, args.reps, args.eager)["bnb"]
            rows.append(row)
            del inputs
            torch.cuda.empty_cache()

    print()
    print(
        f"blocksize {BLOCKSIZE_4BIT} (4-bit), {BLOCKSIZE_8BIT} (8-bit), bf16 in/out; "
        f"copy {copy_tbps:.2f} TB/s, fill {fill_tbps:.2f} TB/s"
    )
    print()
    header = "| op | shape | lowbit ms | GB moved | TB/s | of copy | reference ms | speedup |"
    if bnbf is not None:
        header += " bnb ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        ref_ms = r.get("reference_ms")
        line = (
            f"| {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {r['ms']:.4f} | {r['gb']:.3f} | {r['tbps']:.2f} | "
            f"{100 * r['copy_fraction']:.0f}% | "
            + (f"{ref_ms:.3f} | {ref_ms / r['ms']:.0f}x |" if ref_ms is not None else "- | - |")
        )
        if bnbf is not None:
            line += f" {r['bnb_ms']:.4f} |" if "bnb_ms" in r else " - |"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_tbps=copy_tbps, fill_tbps=fill_tbps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
