"""``lowbit::paged_empty`` and ``lowbit::prefetch_``: shapes, dtypes, opcheck, bad sizes."""

import pytest
import torch

import torchlowbit  # noqa: F401


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_paged_empty_shape_dtype_device(device, dtype):
    like = torch.zeros(3, device=device)
    t = torch.ops.lowbit.paged_empty(like, [5, 7], dtype)
    assert t.shape == (5, 7) and t.dtype == dtype and t.device == like.device
    t.fill_(1)
    torch.ops.lowbit.prefetch_(t)
    torch.ops.lowbit.prefetch_(t, to_device=False)
    assert torch.equal(t, torch.ones(5, 7, dtype=dtype, device=device))
    assert torch.ops.lowbit.paged_empty(like, [0], dtype).numel() == 0


def test_opcheck(device):
    like = torch.randn(4, device=device)
    # the output is uninitialized memory, so only the checks that do not compare values apply
    torch.library.opcheck(
        torch.ops.lowbit.paged_empty.default, (like, [3, 2], torch.float32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lowbit.prefetch_.default, (torch.randn(8, device=device),))


def test_negative_size_raises(device):
    with pytest.raises(ValueError, match="size"):
        torch.ops.lowbit.paged_empty(torch.zeros(1, device=device), [2, -1], torch.float32)
