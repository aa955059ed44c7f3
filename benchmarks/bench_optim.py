"""One optimizer step over 268M float32 parameters (16 tensors of 4096x4096) on CUDA.

Side by side: torch.optim.AdamW(fused=True); torchlowbit.optim.AdamW8bit's and Lion8bit's whole steps (one grouped
update op each), single steps waited for and steps issued back to back (as a training loop issues them: the
host work of a step overlaps the device's); torchlowbit's update ops called per tensor (32-bit Adam, 8-bit
blockwise Adam and Lion; the 8-bit Adam also with the fallback nearest-code search, and replayed from a CUDA
graph); bitsandbytes' AdamW (32-bit), AdamW8bit and Lion8bit when importable.

Times are medians of CUDA-event timings after warm-up (the 4.3 GB of parameters and gradients are far larger
than L2). Bytes per parameter count what a step must move: 32-bit Adam reads p, g, m, v and writes p, m, v
(28 B); 8-bit Adam reads p, g and two 1-byte states and writes p and the states (16 B, plus two float32 absmax
per 256); 8-bit Lion has one state (14 B). Bandwidth is against a device-to-device copy measured in the same
run; "x floor" is the time over the 16-bytes-per-parameter floor at that bandwidth, "x own floor" over the
row's own bytes; "state B/param" is the optimizer's state memory (maps counted once).

    python benchmarks/bench_optim.py [--reps 20] [--tensors 16] [--check] [--json out.json]

--check also compares one 4096x4096 tensor's CUDA steps with the CPU reference kernels and prints the
fraction of 8-bit codes that differ.
"""

import argparse
import json
import os

import torch
from timing import back_to_back_ms, copy_bandwidth, time_ms

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit.codebooks import create_dynamic_map
from torchlowbit.ops import CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS

try:  # optional side-by-side
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

SHAPE = (4096, 4096)
BLOCK = 256
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
LR = 1e-3
FLOOR_BYTES = 16  # bytes per parameter of an 8-bit Adam step: the floor DESIGN.md names


class States8:
    """8-bit blockwise states of one parameter as the optimizers keep them (qmaps shared)."""

    def __init__(self, p, two, signed, unsigned):
        blocks = -(-p.numel() // BLOCK)
        self.state1 = torch.full(p.shape, 127, dtype=torch.uint8, device=p.device)
        self.absmax1 = torch.zeros(blocks, device=p.device)
        self.state2 = torch.zeros(p.shape, dtype=torch.uint8, device=p.device) if two else None
        self.absmax2 = torch.zeros(blocks, device=p.device) if two else None
        self.qmap1, self.qmap2 = signed, unsigned if two else None

    def args(self):
        return self.state1, self.state2, self.absmax1, self.absmax2, self.qmap1, self.qmap2


def lowbit_steps(params, grads, reps, graph_too):
    """(label, bytes per parameter, ms) of the per-tensor op calls."""
    ops = torch.ops.lowbit
    signed, unsigned = create_dynamic_map(signed=True).cuda(), create_dynamic_map(signed=False).cuda()
    lr, step = torch.tensor(LR), torch.tensor(1.0)  # 0-d CPU tensors, as torchlowbit.optim passes them
    hyper = (*BETAS, 0.0, 0.0, EPS, WEIGHT_DECAY, 1.0, 0.0, False)
    per_block = 4 / BLOCK  # one float32 absmax per 256 elements, read and written
    rows = []

    m32 = [torch.zeros_like(p) for p in params]
    v32 = [torch.zeros_like(p) for p in params]

    def adam32():
        for p, g, m, v in zip(params, grads, m32, v32, strict=True):
            ops.optimizer_update_32bit("adam", p, g, m, v, lr, step, *hyper)

    rows.append(("lowbit adam 32-bit (ops)", 28, time_ms(adam32, reps=reps)))
    steps = [step.clone() for _ in params]

    def adam32_grouped():
        ops.optimizer_update_32bit_grouped("adam", params, grads, m32, v32, lr, steps, *hyper)

    rows.append(("lowbit adam 32-bit (one grouped op)", 28, time_ms(adam32_grouped, reps=reps)))
    m32.clear(), v32.clear()
    torch.cuda.empty_cache()

    for name, two, nbytes in (("adam", True, 16 + 4 * per_block), ("lion", False, 14 + 2 * per_block)):
        states = [States8(p, two, signed, unsigned) for p in params]

        def step8(name=name, states=states, lr=lr, step=step):
            for p, g, st in zip(params, grads, states, strict=True):
                ops.optimizer_update_8bit_blockwise(name, p, g, *st.args(), lr, step, *hyper)

        rows.append((f"lowbit {name} 8-bit (ops)", nbytes, time_ms(step8, reps=reps)))
        steps = [step.clone() for _ in params]

        # state1, state2, absmax1, absmax2 as lists (empty where the optimizer has one state), and the maps
        lists = [[t for t in column if t is not None] for column in zip(*(st.args()[:4] for st in states), strict=True)]
        maps = states[0].args()[4:]

        def grouped8(name=name, lists=lists, maps=maps, steps=steps):
            ops.optimizer_update_8bit_blockwise_grouped(name, params, grads, *lists, *maps, lr, steps, *hyper)

        rows.append((f"lowbit {name} 8-bit (one grouped op)", nbytes, time_ms(grouped8, reps=reps)))
        if name == "adam":
            os.environ["TORCHLOWBIT_OPTIM_SEARCH"] = "tree"
            try:
                rows.append(("lowbit adam 8-bit, fallback search (ops)", nbytes, time_ms(step8, reps=reps)))
            finally:
                del os.environ["TORCHLOWBIT_OPTIM_SEARCH"]
            if graph_too:
                lr_dev, step_dev = torch.tensor(LR, device="cuda"), torch.tensor(1.0, device="cuda")
                step8(lr=lr_dev, step=step_dev)  # warm-up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step8(lr=lr_dev, step=step_dev)
                rows.append(("lowbit adam 8-bit (ops, CUDA graph)", nbytes, time_ms(graph.replay, reps=reps)))
                del graph
        states.clear()
        torch.cuda.empty_cache()
    return rows


def state_bytes_per_param(optimizer, numel: int) -> float:
    """Bytes of optimizer state per parameter (a storage shared between parameters counted once)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values()) / numel


def optimizer_steps(params, grads, reps):
    """(label, bytes per parameter, ms, state bytes per parameter) of whole optimizer.step() calls: single steps
    waited for, and steps issued back to back (as a training loop issues them)."""
    rows = []
    leaves = [torch.nn.Parameter(p) for p in params]  # share storage with params
    for leaf, g in zip(leaves, grads, strict=True):
        leaf.grad = g
    per_block = 4 / BLOCK
    candidates = [
        (
            "torch AdamW fused (32-bit)",
            28,
            lambda: torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True),
        )
    ]
    candidates.append(
        (
            "lowbit optim.AdamW8bit step",
            16 + 4 * per_block,
            lambda: torchlowbit.optim.AdamW8bit(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
        )
    )
    candidates.append(
        (
            "lowbit optim.Lion8bit step",
            14 + 2 * per_block,
            lambda: torchlowbit.optim.Lion8bit(leaves, lr=LR / 10, weight_decay=WEIGHT_DECAY),
        )
    )
    if bnb is not None:
        candidates += [
            ("bnb AdamW (32-bit)", 28, lambda: bnb.optim.AdamW(
                leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, optim_bits=32)),
            ("bnb AdamW8bit", 16 + 4 * per_block, lambda: bnb.optim.AdamW8bit(
                leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)),
            ("bnb Lion8bit", 14 + 2 * per_block, lambda: bnb.optim.Lion8bit(
                leaves, lr=LR / 10, weight_decay=WEIGHT_DECAY)),
        ]  # fmt: skip
    for label, nbytes, make in candidates:
        try:
            optimizer = make()
            single = time_ms(optimizer.step, reps=reps)
            state = state_bytes_per_param(optimizer, sum(p.numel() for p in params))
            rows.append((label, nbytes, single, state))
            rows.append((f"{label}, back to back", nbytes, back_to_back_ms(optimizer.step, reps), state))
        except Exception as error:  # noqa: BLE001  (a benchmark row, not a test)
            print(f"{label}: skipped ({type(error).__name__}: {error})")
        optimizer = None
        torch.cuda.empty_cache()
    return rows


def check_against_cpu(steps=2):
    """Fractions of 8-bit codes that differ from the CPU reference, and the largest differences of p."""
    ops = torch.ops.lowbit
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(SHAPE, generator=gen)
    signed, unsigned = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
    print("\ncheck against the CPU reference (one 4096x4096 float32 tensor, each step from the CPU's tensors):")
    for name, bits in (("adam", 32), ("adam", 8), ("lion", 8), ("ademamix", 8), ("lamb", 8)):
        two = name in ("adam", "ademamix", "lamb")
        rows = 2 if name == "ademamix" else 1
        blocks = -(-p0.numel() // BLOCK)
        p = p0.clone()
        if bits == 32:
            states = [torch.zeros(p.shape), torch.zeros(p.shape)]
        else:
            states = [
                torch.full((rows, *p.shape) if rows > 1 else p.shape, 127, dtype=torch.uint8),
                torch.zeros(p.shape, dtype=torch.uint8) if two else None,
                torch.zeros((rows, blocks) if rows > 1 else blocks),
                torch.zeros(blocks) if two else None,
                signed,
                unsigned if two else None,
            ]
        max_unorm = 0.02 if name == "lamb" else 0.0
        hyper = (0.9, 0.999, 0.9999, 5.0, EPS, WEIGHT_DECAY, 1.0, max_unorm, False)
        for t in range(1, steps + 1):
            g = torch.randn(SHAPE, generator=gen)
            lr, step = torch.tensor(LR), torch.tensor(float(t))
            cpu_p, cpu_states = p.clone(), [None if s is None else s.clone() for s in states]
            dev_p, dev_states = p.cuda(), [None if s is None else s.cuda() for s in states]
            op = ops.optimizer_update_32bit if bits == 32 else ops.optimizer_update_8bit_blockwise
            op(name, cpu_p, g, *cpu_states, lr, step, *hyper)
            op(name, dev_p, g.cuda(), *dev_states, lr, step, *hyper)
            dev_p = dev_p.cpu()
            line = f"  {name} {bits}-bit step {t}: p equal {torch.eq(dev_p, cpu_p).float().mean().item():.6f}, "
            line += f"max |dp| {(dev_p - cpu_p).abs().max().item():.3e}"
            if bits == 8:
                for label, ci, ai in (("state1", 0, 2), ("state2", 1, 3)):
                    if cpu_states[ci] is None:
                        continue
                    d_codes = dev_states[ci].cpu()
                    differ = (d_codes != cpu_states[ci]).float().mean().item()
                    gap = (d_codes.int() - cpu_states[ci].int()).abs().max().item()
                    am_err = (dev_states[ai].cpu() - cpu_states[ai]).abs() / cpu_states[ai].abs().clamp_min(1e-30)
                    line += f"; {label} codes differ {differ:.2e} (max gap {gap}), absmax rel err {am_err.max():.1e}"
            else:
                for label, i in (("m", 0), ("v", 1)):
                    line += f"; {label} equal {torch.eq(dev_states[i].cpu(), cpu_states[i]).float().mean():.6f}"
            print(line)
            p, states = cpu_p, cpu_states


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="compare with the CPU reference first")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph row")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_optim needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, extension: {CUDA_EXTENSION_STATUS}")
    ops = ("optimizer_update_32bit", "optimizer_update_8bit_blockwise")
    native = [op for op in ops if op not in CUDA_REFERENCE_OPS]
    print(f"native CUDA optimizer ops: {native}; bitsandbytes: {bnb.__version__ if bnb else 'not importable'}")
    if args.check:
        check_against_cpu()

    copy_tbps = copy_bandwidth(args.reps)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(SHAPE, device="cuda", generator=gen) for _ in range(args.tensors)]
    grads = [torch.randn(SHAPE, device="cuda", generator=gen) * 1e-2 for _ in range(args.tensors)]
    numel = sum(p.numel() for p in params)
    rows = optimizer_steps(params, grads, args.reps)
    rows += lowbit_steps(params, grads, args.reps, not args.no_graph)
    floor_ms = FLOOR_BYTES * numel / (copy_tbps * 1e9)

    print()
    print(
        f"{args.tensors} x {SHAPE[0]}x{SHAPE[1]} float32 parameters ({numel / 1e6:.0f}M); copy {copy_tbps:.2f} TB/s; "
        f"floor of {FLOOR_BYTES} B/param: {floor_ms:.3f} ms"
    )
    print()
    print("| step | ms | B/param moved | TB/s | of copy | x floor (16 B/param) | x own floor | state B/param |")
    print("|---|---|---|---|---|---|---|---|")
    out = []
    for label, nbytes, ms, *state in rows:
        tbps = nbytes * numel / ms / 1e9
        own = ms / (nbytes * numel / (copy_tbps * 1e9))  # the time over this step's own bytes at copy speed
        state_text = f"{state[0]:.3f}" if state else "-"
        print(
            f"| {label} | {ms:.3f} | {nbytes:.2f} | {tbps:.2f} | {100 * tbps / copy_tbps:.0f}% | {ms / floor_ms:.2f} "
            f"| {own:.2f} | {state_text} |"
        )
        out.append(dict(step=label, ms=ms, bytes_per_param=nbytes, tbps=tbps, x_floor=ms / floor_ms, x_own_floor=own,
                        state_bytes_per_param=state[0] if state else None))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_tbps=copy_tbps, numel=numel, floor_ms=floor_ms, rows=out), f, indent=1)


if __name__ == "__main__":
    main()
