"""Argument checks shared by the fake and reference kernels: clear errors naming the argument."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
BLOCKSIZES = tuple(2**k for k in range(5, 13))


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if blocksize not in BLOCKSIZES or isinstance(blocksize, bool):
        raise ValueError(f"{name} must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


def check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {_names(allowed)}, got {t.dtype}")


def check_dtype_arg(dtype: torch.dtype, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if dtype not in allowed:
        raise TypeError(f"{name} must be one of {_names(allowed)}, got {dtype}")


def check_numel(t: torch.Tensor, name: str, expected: int, what: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{name} must have {expected} elements ({what}), got {t.numel()}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        found = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {found}")


def check_int8_weight(CB: torch.Tensor, SCB: torch.Tensor, prefix: str = "") -> None:
    """A row-wise int8 weight: ``CB (n, k)`` int8 with float32 row scales ``SCB (n,)``; names start with ``prefix``."""
    check_dtype(CB, f"{prefix}CB", (torch.int8,))
    check_dtype(SCB, f"{prefix}SCB", (torch.float32,))
    if CB.dim() != 2:
        raise ValueError(f"{prefix}CB must be 2-d (n, k), got shape {list(CB.shape)}")
    if SCB.shape != (CB.shape[0],):
        raise ValueError(
            f"{prefix}SCB must have shape ({CB.shape[0]},), one scale per row of {prefix}CB, got {list(SCB.shape)}"
        )


def check_code(code: torch.Tensor, name: str = "code", entries: int = 256) -> None:
    check_dtype(code, name, (torch.float32,))
    check_numel(code, name, entries, f"a {entries}-entry float32 code")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "(" + ", ".join(str(d).removeprefix("torch.") for d in dtypes) + ")"
