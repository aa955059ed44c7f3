"""Run a function in several processes joined in one process group: 2 CPU ranks over gloo, or one GPU each."""

import inspect
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

BACKENDS = ["gloo"] + (["nccl"] if torch.cuda.device_count() >= 2 else [])
# Before torch 2.13, FSDP2 wraps every shard as nn.Parameter(dtensor) with requires_grad=True, which
# integer tensors (uint8-stored 4-bit codes, int8 weights) cannot take; floating quant_storage works there.
INTEGER_PARAMS = "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, backend: str, port: int, fn, args: tuple) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)  # fmt: skip
    try:
        fn(device, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # A passing rank leaves at once: torch's teardown of its worker threads at interpreter exit
    # sometimes aborts ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, *args, backend: str = "gloo", world_size: int = 2) -> None:
    """``fn(device, *args)`` on every rank; raises if any rank raises."""
    torch.set_num_threads(1)
    mp.spawn(_entry, args=(world_size, backend, _free_port(), fn, args), nprocs=world_size, join=True)
