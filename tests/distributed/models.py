"""What several distributed tests build: a small LLM.int8 model, and FSDP2 sharding layer by layer."""

import torch
from torch.distributed.fsdp import fully_shard

import torchlowbit as bnb


def int8_mlp(device, seed: int = 0) -> torch.nn.Sequential:
    """Two frozen ``Linear8bitLt`` layers (64 -> 128 -> 64, threshold 6)."""
    torch.manual_seed(seed)
    layers = [bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False, threshold=6.0) for i, o in [(64, 128), (128, 64)]]
    return torch.nn.Sequential(*layers).to(device)


def shard(model: torch.nn.Module, layers, mesh, compiled: bool = False, **options) -> None:
    """``fully_shard`` each of ``layers`` (then ``compile`` it, if asked), then the whole model."""
    for layer in layers:
        fully_shard(layer, mesh=mesh, **options)
        if compiled:
            layer.compile()
    fully_shard(model, mesh=mesh, **options)
