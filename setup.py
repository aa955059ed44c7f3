"""Builds the CUDA kernels of ``csrc/`` as ``torchlowbit._C`` (with ninja) where a CUDA toolkit and a
CUDA build of torch are present; elsewhere installs the pure-Python package.

Set ``TORCHLOWBIT_NO_CUDA=1`` to skip the extension, ``TORCH_CUDA_ARCH_LIST`` to choose the GPU archs (Hopper,
9.0, is built as 9.0a: the many-rows 4-bit kernel uses its wgmma).
"""

import os
import runpy
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

# By path: importing the package would load the extension being built.
sm90a_defines = runpy.run_path("torchlowbit/ops/cuda_arch.py")["sm90a_defines"]


def _cuda_extensions() -> list:
    if os.environ.get("TORCHLOWBIT_NO_CUDA") == "1" or torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    sources = sorted(str(p) for p in Path("csrc").glob("*.c[up]*"))
    defines = sm90a_defines()
    return [
        cpp_extension.CUDAExtension(
            name="torchlowbit._C",
            sources=sources,
            extra_compile_args={"cxx": ["-O3", *defines], "nvcc": ["-O3", "-lineinfo", *defines]},
        )
    ]


extensions = _cuda_extensions()
setup(
    ext_modules=extensions,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)} if extensions else {},
)
