"""The two DTensor moves the modules and optimizers share: the local shard, and a shard wrapped like another."""

import torch


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor, else the tensor itself (``None`` stays ``None``)."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def sharded_like(shard: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...], leading: int = 0) -> torch.Tensor:
    """``shard`` as the local part of a contiguous DTensor of ``shape`` placed as ``like`` on its mesh.

    ``leading``: how many dimensions ``shape`` has in front of ``like``'s (its Shard dims shift by that much).
    """
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(pl.dim + leading) if pl.is_shard() else pl for pl in like.placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(shard, like.device_mesh, placements, run_check=False, shape=shape, stride=stride)
