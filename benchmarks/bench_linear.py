"""Speed of 4-bit and 8-bit linear layers on CUDA: torch bf16 F.linear, torchlowbit NF4 (nested absmax, blocksize
64) through torch.ops.lowbit.gemm_4bit, LLM.int8 through torch.ops.lowbit.int8_mixed_linear at threshold 0 and 6
(the threshold-6 input has OUTLIER_COLUMNS columns of magnitude above 6, as LLM.int8 sees in large models), and
bitsandbytes' matmul_4bit where it is importable.

Shapes are DESIGN.md's (in x out, rows m of the bf16 activation). Times are medians of CUDA-event timings
after warm-up, in ms per call. By default each timing replays a CUDA graph of several calls that cycle through
copies of the weights and inputs (enough copies to exceed 4x the L2 cache), so the figures are device time
without Python dispatch, and the cases of a row (bf16, NF4, int8) replay in turn, in a shuffled order each round,
so that they share the GPU's clocks and temperature; --eager times single eager calls instead (event pair around
each call). For small m the packed weight bytes (codes + uint8 absmax + nested scales) are counted against the
measured device copy bandwidth.

    python benchmarks/bench_linear.py [--reps 30] [--eager] [--sweep] [--json out.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from timing import copies_for, copy_bandwidth, time_cases

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit import codebooks
from torchlowbit.ops import CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS

try:  # optional side-by-side
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
except Exception:  # noqa: BLE001
    bnb = bnbf = None

SHAPES = [  # (in, out, rows)
    (4096, 4096, (1, 32, 4096)),
    (4096, 14336, (1, 8, 32)),
    (8192, 28672, (1, 8, 32, 512, 4096)),
]
SWEEP_ROWS = (16, 32, 48, 64, 96, 128, 192, 256)
BLOCKSIZE = 64
OUTLIER_COLUMNS = 8
SMALL_M = 32  # rows up to which the bandwidth column is shown


class Layer:
    """One (out, in) bf16 weight, its torchlowbit NF4 form (nested), and its bitsandbytes NF4 form."""

    def __init__(self, in_f, out_f, want_bnb):
        self.shape = (out_f, in_f)
        W = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        self.bf16 = W
        code = codebooks.create_dynamic_map().cuda()
        packed, absmax = torch.ops.lowbit.quantize_4bit(W, BLOCKSIZE, "nf4", torch.uint8)
        offset = absmax.mean().reshape(1)
        qabsmax, nested_absmax = torch.ops.lowbit.quantize_blockwise(absmax - offset, code, 256)
        self.lowbit = (packed, qabsmax, nested_absmax, code, offset)
        self.packed_bytes = packed.numel() + qabsmax.numel() + nested_absmax.numel() * 4
        self.int8 = torch.ops.lowbit.int8_vectorwise_quant(W)[:2]  # (CB, SCB)
        self.bnb = None
        if want_bnb and bnbf is not None:
            try:
                self.bnb = bnbf.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            except Exception as error:  # noqa: BLE001
                print(f"bitsandbytes quantize_4bit failed: {error}")


def lowbit_linear(A, layer):
    packed, qabsmax, nested_absmax, code, offset = layer.lowbit
    return torch.ops.lowbit.gemm_4bit(
        A, packed, qabsmax, BLOCKSIZE, "nf4", layer.shape, None, nested_absmax, code, offset, 256
    )


def dequant_linear(A, layer):
    """The many-rows path written out in Python: dequantize to bf16, then cuBLAS."""
    packed, qabsmax, nested_absmax, code, offset = layer.lowbit
    W = torch.ops.lowbit.dequantize_4bit(
        packed, qabsmax, BLOCKSIZE, "nf4", layer.shape, A.dtype, nested_absmax, code, offset, 256
    )
    return F.linear(A, W)


def int8_linear(A, layer, threshold=0.0):
    CB, SCB = layer.int8
    return torch.ops.lowbit.int8_mixed_linear(A, CB, SCB, None, threshold)[0]


def with_outliers(A):
    """``A`` with OUTLIER_COLUMNS evenly spread columns set to +-8 (outliers at threshold 6)."""
    A = A.clone()
    columns = A[:, :: A.shape[1] // OUTLIER_COLUMNS]
    columns.copy_(8.0 * torch.sign(columns))
    return A


def bnb_linear(A, layer):
    qweight, state = layer.bnb
    return bnb.matmul_4bit(A, qweight.t(), quant_state=state)


def check_close(A, layer):
    """The op against dequantize + bf16 F.linear on one input (a guard against timing a broken kernel)."""
    out = lowbit_linear(A, layer).float()
    ref = dequant_linear(A.float(), layer)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"gemm_4bit differs from dequantize + linear: relative error {rel:.3g}"
    CB, SCB = layer.int8
    W8 = CB.float() * (SCB / 127)[:, None]
    for X, threshold in ((A, 0.0), (with_outliers(A), 6.0)):
        out8, ref8 = int8_linear(X, layer, threshold).float(), F.linear(X.float(), W8)
        rel8 = ((out8 - ref8).norm() / ref8.norm()).item()
        assert rel8 < 2e-2, f"int8_mixed_linear (threshold {threshold}) differs from F.linear: {rel8:.3g}"
    return rel


def run_shape(in_f, out_f, rows, reps, eager, with_bnb):
    n_layers = copies_for(out_f * in_f // 2)  # the NF4 weights rotate; bf16 weights are 4x larger
    layers = [Layer(in_f, out_f, with_bnb) for _ in range(n_layers)]
    results = []
    for m in rows:
        a_bytes = m * in_f * 2
        n_bf16 = max(1, min(n_layers, copies_for(out_f * in_f * 2 + a_bytes)))
        n_q = max(1, min(n_layers, copies_for(layers[0].packed_bytes + a_bytes)))
        acts = [torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(max(n_bf16, n_q))]
        rel = check_close(acts[0], layers[0])
        row = dict(in_features=in_f, out_features=out_f, m=m, check_rel_err=rel)
        n_8 = max(1, min(n_layers, copies_for(out_f * in_f + a_bytes)))
        outlier_inputs = [(with_outliers(acts[i]), layers[i]) for i in range(n_8)]
        cases = {
            "bf16_ms": (lambda A, L: F.linear(A, L.bf16), [(acts[i], layers[i]) for i in range(n_bf16)]),
            "lowbit_ms": (lowbit_linear, [(acts[i], layers[i]) for i in range(n_q)]),
            "int8_ms": (int8_linear, [(acts[i], layers[i]) for i in range(n_8)]),
            "int8_t6_ms": (lambda A, L: int8_linear(A, L, 6.0), outlier_inputs),
        }
        row.update(time_cases(cases, reps, eager))
        if layers[0].bnb is not None:
            row.update(time_cases({"bnb_ms": (bnb_linear, [(acts[i], layers[i]) for i in range(n_q)])}, reps, eager))
        row["packed_gb"] = (layers[0].packed_bytes + a_bytes + m * out_f * 2) / 1e9
        results.append(row)
        print(f"  {in_f}x{out_f} m={m}: bf16 {row['bf16_ms']:.4f} ms, lowbit {row['lowbit_ms']:.4f} ms, "
              f"int8 {row['int8_ms']:.4f} / {row['int8_t6_ms']:.4f} ms"
              + (f", bnb {row['bnb_ms']:.4f} ms" if "bnb_ms" in row else ""), flush=True)  # fmt: skip
        del acts
    del layers
    torch.cuda.empty_cache()
    return results


def sweep(reps, eager):
    """The op (whatever path it takes for m) against dequantize + F.linear and bf16, over m."""
    rows = []
    for in_f, out_f in ((4096, 4096), (8192, 28672)):
        n_layers = copies_for(out_f * in_f // 2)
        layers = [Layer(in_f, out_f, False) for _ in range(min(n_layers, 8))]
        for m in SWEEP_ROWS:
            acts = [torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16) for _ in layers]
            inputs = list(zip(acts, layers, strict=True))
            row = dict(in_features=in_f, out_features=out_f, m=m)
            cases = {
                "op_ms": (lowbit_linear, inputs),
                "dequant_linear_ms": (dequant_linear, inputs),
                "bf16_ms": (lambda A, L: F.linear(A, L.bf16), inputs),
            }
            row.update(time_cases(cases, reps, eager))
            rows.append(row)
            print(f"  sweep {in_f}x{out_f} m={m}: op {row['op_ms']:.4f}, dequant+linear "
                  f"{row['dequant_linear_ms']:.4f}, bf16 {row['bf16_ms']:.4f}", flush=True)  # fmt: skip
        del layers
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--eager", action="store_true", help="time single eager calls instead of graph replays")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even where importable")
    parser.add_argument("--sweep", action="store_true", help="also sweep m for the fused / dequantize crossover")
    parser.add_argument("--only-sweep", action="store_true", help="only the sweep")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear needs a CUDA device")
    torch.manual_seed(0)
    with_bnb = bnbf is not None and not args.no_bnb
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, extension: {CUDA_EXTENSION_STATUS}")
    print(f"bitsandbytes: {bnb.__version__ if bnb is not None else 'not importable'}")
    for op in ("gemm_4bit", "int8_mixed_linear"):
        if op in CUDA_REFERENCE_OPS:
            print(f"WARNING: lowbit::{op} runs the PyTorch reference kernel on CUDA")
    copy_tbps = copy_bandwidth(20)
    mode = "eager calls" if args.eager else "CUDA-graph replays"
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write); timing: {mode}", flush=True)

    rows, sweep_rows = [], []
    if not args.only_sweep:
        for in_f, out_f, ms in SHAPES:
            rows += run_shape(in_f, out_f, ms, args.reps, args.eager, with_bnb)
    if args.sweep or args.only_sweep:
        sweep_rows = sweep(args.reps, args.eager)

    if rows:
        print()
        print(f"NF4 blocksize {BLOCKSIZE}, nested absmax, bf16 activations; ms per call ({mode}); "
              f"copy {copy_tbps:.2f} TB/s")  # fmt: skip
        print()
        header = "| in x out | m | bf16 ms | lowbit ms | bf16 / lowbit |"
        if with_bnb:
            header += " bnb ms | bnb / lowbit |"
        header += " lowbit TB/s (weights) | of copy | int8 t=0 ms | bf16 / int8 | int8 t=6 ms | t=6 / t=0 |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for r in rows:
            line = (f"| {r['in_features']}x{r['out_features']} | {r['m']} | {r['bf16_ms']:.4f} | "
                    f"{r['lowbit_ms']:.4f} | {r['bf16_ms'] / r['lowbit_ms']:.2f}x |")  # fmt: skip
            if with_bnb:
                line += f" {r['bnb_ms']:.4f} | {r['bnb_ms'] / r['lowbit_ms']:.2f}x |" if "bnb_ms" in r else " - | - |"
            if r["m"] <= SMALL_M:
                tbps = r["packed_gb"] / r["lowbit_ms"]
                line += f" {tbps:.2f} | {100 * tbps / copy_tbps:.0f}% |"
            else:
                line += " - | - |"
            line += (f" {r['int8_ms']:.4f} | {r['bf16_ms'] / r['int8_ms']:.2f}x | {r['int8_t6_ms']:.4f} |"
                     f" {r['int8_t6_ms'] / r['int8_ms']:.2f}x |")  # fmt: skip
            print(line)
    if sweep_rows:
        print()
        print("| in x out | m | gemm_4bit ms | dequantize + F.linear ms | bf16 ms |")
        print("|---|---|---|---|---|")
        for r in sweep_rows:
            print(f"| {r['in_features']}x{r['out_features']} | {r['m']} | {r['op_ms']:.4f} | "
                  f"{r['dequant_linear_ms']:.4f} | {r['bf16_ms']:.4f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_tbps=copy_tbps, mode=mode, rows=rows, sweep=sweep_rows), f, indent=1)


if __name__ == "__main__":
    main()
