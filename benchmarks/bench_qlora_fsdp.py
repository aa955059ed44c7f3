"""QLoRA training step under FSDP2 on every GPU of the host: an NF4 base versus the same model in bf16.

Run: ``torchrun --nproc-per-node 2 benchmarks/bench_qlora_fsdp.py [--out results/qlora_fsdp_h200x2.md]``.
Both models are Llama-shaped (tests/distributed/tiny_llama.py at 1.1B parameters by default), have frozen
bases with rank-8 LoRA adapters on every projection, activation checkpointing per block, bf16 compute through
``MixedPrecisionPolicy``, and train with ``AdamW8bit``. Reported per GPU: median step time, peak allocated
memory, and the bytes of the local parameter shards.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))
from timing import emit  # noqa: E402
from tiny_llama import TinyLlama, loss_fn  # noqa: E402

import torchlowbit as bnb  # noqa: E402
from torchlowbit.nn.quantized_parameter import QuantizedParameter  # noqa: E402


def _local_param_bytes(model: torch.nn.Module) -> int:
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        inner = local.inner().values() if isinstance(local, QuantizedParameter) else [local]
        total += sum(t.numel() * t.element_size() for t in inner if t is not None)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(args, device: torch.device, quantized: bool, compiled: bool) -> dict:
    torch.manual_seed(0)
    with device:
        model = TinyLlama(args.vocab, args.dim, args.layers, args.heads, args.hidden, quantized, torch.bfloat16, True)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        if compiled:
            block.compile()
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
        _sync(device)
        start = time.perf_counter()
        loss_fn(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    result = {
        "step_ms": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "params_gib": _local_param_bytes(model) / 2**30,
        "loss": loss_fn(model, tokens).item(),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in [("vocab", 32000), ("dim", 2048), ("layers", 22), ("heads", 16), ("hidden", 5632),
                          ("batch", 4), ("seq", 2048), ("warmup", 3), ("steps", 10)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU: a smoke test of the script, no figures")
    args = parser.parse_args()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo" if args.cpu else "nccl", device_id=None if args.cpu else device)
    if not args.cpu:
        torch.cuda.set_device(device)
    rows = []
    for compiled in (False, True):
        bf16 = _measure(args, device, quantized=False, compiled=compiled)
        nf4 = _measure(args, device, quantized=True, compiled=compiled)
        rows.append((compiled, bf16, nf4))
    if dist.get_rank() == 0:
        world, name = dist.get_world_size(), "CPU" if args.cpu else torch.cuda.get_device_name()
        lines = [
            f"QLoRA step under FSDP2 on {world} x {name}: Llama-shaped, dim {args.dim}, "
            f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens "
            f"per GPU; LoRA rank 8 on every projection; activation checkpointing; AdamW8bit. Per GPU, medians of "
            f"{args.steps} steps after {args.warmup}.",
            "",
            "| mode | base | step ms | peak GiB | param shards GiB | step vs bf16 | peak vs bf16 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for compiled, bf16, nf4 in rows:
            mode = "compiled" if compiled else "eager"
            for name, r in (("bf16", bf16), ("nf4", nf4)):
                lines.append(
                    f"| {mode} | {name} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['params_gib']:.3f} | "
                    f"{r['step_ms'] / bf16['step_ms']:.2f}x | {r['peak_gib'] / bf16['peak_gib']:.2f}x |"
                )
        emit(lines, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
