"""lowbit::quantize_blockwise / dequantize_blockwise: 8-bit codes into a 256-entry map."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchlowbit.functional import create_dynamic_map, create_linear_map

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _quantize(A, code=None, blocksize=256, seed=None):
    code = create_dynamic_map().to(A.device) if code is None else code
    return torch.ops.lowbit.quantize_blockwise(A, code, blocksize, seed)


def test_dynamic_map_facts():
    signed = create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    assert signed.shape == (256,) and signed.dtype == torch.float32
    assert torch.equal(signed, signed.sort().values)
    assert (signed == 0).sum() == 1
    assert signed[-1] == 1.0 and abs(signed[0].item() + 0.99297) < 1e-5
    unsigned = create_dynamic_map(signed=False)
    assert unsigned[0] == 0.0 and unsigned[-1] == 1.0 and (unsigned >= 0).all()
    assert unsigned.unique().numel() == 256


def _bits(values: torch.Tensor) -> list[str]:
    return [f"{v & 0xFFFFFFFF:08x}" for v in values.view(torch.int32).tolist()]


def test_dynamic_maps_are_bit_identical_to_the_original_library():
    # Float32 bit patterns of the original library's maps (torch.linspace on an AVX2/AVX-512 CPU).
    signed, unsigned = create_dynamic_map(), create_dynamic_map(signed=False)
    assert _bits(signed[[0, 1, 20, 64, 126, 127, 128, 200, 255]]) == [
        "bf7e3333", "bf7a999a", "bf363334", "bdc9eb85", "b513a3b7", "00000000", "3513a3b7", "3e6f3333", "3f800000",
    ]  # fmt: skip
    assert _bits(unsigned[[0, 1, 31, 64, 200, 255]]) == [
        "00000000", "34ae7baa", "3a958106", "3c466667", "3f1de666", "3f800000",
    ]  # fmt: skip


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_codes_are_the_nearest_entries(device, blocksize):
    A = torch.randn(2 * blocksize + 11, device=device) * 10
    code = create_dynamic_map().to(device)
    q, absmax = _quantize(A, code, blocksize)
    blocks = torch.nn.functional.pad(A.cpu(), (0, -A.numel() % blocksize)).view(-1, blocksize)
    assert torch.equal(absmax.cpu(), blocks.abs().amax(1))
    x = (blocks * (1 / blocks.abs().amax(1))[:, None]).view(-1)[: A.numel()].double()
    distance = (x[:, None] - code.cpu().double()[None, :]).abs()
    best = distance.min(1).values
    chosen = distance.gather(1, q.cpu().long().view(-1, 1)).view(-1)
    assert ((chosen - best) <= 1e-7).all()  # nearest, up to exactly-halfway ties


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(0, 5000),
    blocksize=st.sampled_from([2**k for k in range(5, 13)]),
    dtype=st.sampled_from(DTYPES),
    signed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_roundtrip_error_within_half_a_code_step(numel, blocksize, dtype, signed, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(numel, generator=generator).to(dtype)
    A = A if signed else A.abs()
    code = create_dynamic_map(signed=signed)
    q, absmax = _quantize(A, code, blocksize)
    out = torch.ops.lowbit.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert out.shape == A.shape and out.dtype == dtype and q.dtype == torch.uint8
    values = code.double()
    block_absmax = absmax.double().repeat_interleave(blocksize)[:numel]
    x = A.double() / torch.where(block_absmax > 0, block_absmax, 1)
    upper = torch.bucketize(x, values).clamp(1, 255)
    half_step = (values[upper] - values[upper - 1]) / 2
    bound = half_step * block_absmax * (1 + 1e-5) + out.double().abs() * torch.finfo(dtype).eps
    assert ((out.double() - A.double()).abs() <= bound).all()


def test_stochastic_rounding_is_unbiased_between_neighbours(device):
    code = create_linear_map(signed=True).to(device)
    A = torch.full((8, 4096), 0.3, device=device)
    A[:, 0] = 1.0  # every block's absmax is 1, so values are not rescaled
    q, absmax = _quantize(A, code, 4096, seed=1234)
    values = code[q[:, 1:].long()]
    neighbours = code.sort().values
    low = neighbours[neighbours <= 0.3].max()
    high = neighbours[neighbours >= 0.3].min()
    assert set(values.unique().tolist()) <= {low.item(), high.item()}
    assert abs(values.mean().item() - 0.3) < 2e-4
    again, _ = _quantize(A, code, 4096, seed=1234)
    assert torch.equal(q, again)


@pytest.mark.parametrize("numel", [0, 1])
def test_empty_and_single_element(device, numel):
    A = torch.full((numel,), 2.5, device=device)
    q, absmax = _quantize(A)
    assert q.shape == (numel,) and absmax.shape == (numel,)
    out = torch.ops.lowbit.dequantize_blockwise(q, absmax, create_dynamic_map().to(device), 256, torch.float32)
    assert torch.equal(out, A)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_opcheck(device, dtype, blocksize):
    A = torch.randn(30, 100, device=device, dtype=dtype).t()  # non-contiguous, partial last block
    code = create_dynamic_map().to(device)
    torch.library.opcheck(torch.ops.lowbit.quantize_blockwise.default, (A, code, blocksize))
    torch.library.opcheck(torch.ops.lowbit.quantize_blockwise.default, (A, code, blocksize, 7))
    q, absmax = _quantize(A.contiguous(), code, blocksize)
    torch.library.opcheck(torch.ops.lowbit.dequantize_blockwise.default, (q.t(), absmax, code, blocksize, dtype))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda A, c: torch.ops.lowbit.quantize_blockwise(A, c, 100), ValueError, "blocksize must be a power of two"),
        (lambda A, c: torch.ops.lowbit.quantize_blockwise(A.double(), c, 64), TypeError, "A must have dtype in"),
        (lambda A, c: torch.ops.lowbit.quantize_blockwise(A, c[:16], 64), ValueError, "code must have 256 elements"),
        (lambda A, c: torch.ops.lowbit.quantize_blockwise(A, c.half(), 64), TypeError, "code must have dtype"),
        (
            lambda A, c: torch.ops.lowbit.dequantize_blockwise(
                _quantize(A, c, 64)[0], torch.ones(5), c, 64, torch.float32
            ),
            ValueError,
            "absmax must have 2 elements",
        ),
        (
            lambda A, c: torch.ops.lowbit.dequantize_blockwise(A, torch.ones(2), c, 64, torch.float32),
            TypeError,
            "A must have dtype in",
        ),
        (lambda A, c: torch.ops.lowbit.quantize_blockwise(A, c.to("meta"), 64), ValueError, "one device"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(100), create_dynamic_map())
