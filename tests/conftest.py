import pytest
import torch

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every test that takes ``device`` runs on the CPU and, where present, on CUDA."""
    return request.param
