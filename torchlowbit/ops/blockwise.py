"""Block layout math shared by the 8-bit and 4-bit reference kernels.

A tensor is split into blocks of ``blocksize`` consecutive elements of its row-major flattening; the
last block may be partial (it is zero-padded here, which leaves its absmax unchanged).
"""

import torch


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def blocks(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``A`` flattened to float32 and zero-padded into ``(num_blocks, blocksize)``."""
    flat = A.reshape(-1).float()
    pad = num_blocks(flat.numel(), blocksize) * blocksize - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def normalize(block_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1] by multiplying with the reciprocal absmax."""
    absmax = block_values.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return block_values * inverse[:, None], absmax


def nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the entry nearest to each ``x`` (halfway values take the smaller entry)."""
    values, order = code.sort()
    midpoints = (values[1:] + values[:-1]) / 2
    return order[torch.bucketize(x, midpoints)]


def stochastic(x: torch.Tensor, code: torch.Tensor, seed: int) -> torch.Tensor:
    """Index of one of the two entries around ``x``, the upper one with probability of its proximity."""
    values, order = code.sort()
    upper = torch.bucketize(x, values).clamp(1, values.numel() - 1)
    low, high = values[upper - 1], values[upper]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    take_upper = noise < (x - low) / span
    return order[torch.where(take_upper, upper, upper - 1)]


def expand_absmax(absmax: torch.Tensor, numel: int, blocksize: int) -> torch.Tensor:
    """The float32 absmax of each of the ``numel`` elements."""
    return absmax.float().repeat_interleave(blocksize)[:numel]
