"""The GPU archs the CUDA extension is built for: Hopper (9.0) as 9.0a, whose wgmma the many-rows 4-bit kernel needs.

Shared by ``setup.py`` and the JIT build; imports nothing from torchlowbit.
"""

import os

import torch


def _arch_list() -> list[str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";")
    if archs and archs != "native":
        return [a for a in archs.split(";") if a]
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"{major}.{minor}" for major, minor in sorted(capabilities)]


def sm90a_defines() -> list[str]:
    """Rewrite TORCH_CUDA_ARCH_LIST with 9.0 as 9.0a; the flag that tells the host code when the build has it."""
    archs = ["9.0a" + a[3:] if a.startswith("9.0") and not a.startswith("9.0a") else a for a in _arch_list()]
    if not archs:
        return []
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    return ["-DLOWBIT_SM90A"] if any(a.startswith("9.0a") for a in archs) else []
