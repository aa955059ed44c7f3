"""The arch list the CUDA extension is built for (torchlowbit/ops/cuda_arch.py, used by setup.py and the JIT)."""

import os

import pytest

from torchlowbit.ops.cuda_arch import sm90a_defines


@pytest.mark.parametrize(
    "archs, expected, defines",
    [
        ("9.0", "9.0a", ["-DLOWBIT_SM90A"]),
        ("8.0;9.0+PTX", "8.0;9.0a+PTX", ["-DLOWBIT_SM90A"]),
        ("8.0 8.6", "8.0;8.6", []),
        ("9.0a;10.0", "9.0a;10.0", ["-DLOWBIT_SM90A"]),
    ],
)
def test_hopper_built_as_sm90a(monkeypatch, archs, expected, defines):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    assert sm90a_defines() == defines
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected
