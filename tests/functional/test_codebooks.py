"""Quantization code tables and map constructors against DESIGN.md and the original library's construction."""

import itertools
import math

import pytest
import torch
from helpers import FP4, NF4

from torchlowbit import codebooks
from torchlowbit import functional as F


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Float32 bit patterns (so that -0.0 != 0.0 and every ulp counts)."""
    return t.contiguous().view(torch.int32)


# --------------------------------------------------------------------------------------------------------
# Independent ports of the original library's constructors (bitsandbytes functional.py, see /tmp/bnb_spec.md §2)
# --------------------------------------------------------------------------------------------------------


def _original_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _original_fp8_map(signed=True, exponent_bits=5, precision_bits=2, total_bits=8):
    assert exponent_bits + precision_bits == total_bits - (1 if signed else 0)
    values = []
    bias = 2 ** (exponent_bits - 1)
    for evalue in range(2**exponent_bits):
        for bit_pattern in itertools.product([0, 1], repeat=precision_bits):
            value = 1 if evalue != 0 else 0
            for i, pval in enumerate(bit_pattern):
                value += pval * (2 ** -(i + 1))
            if evalue == 0:
                value = value * 2**-bias
            else:
                value = value * 2 ** -(evalue - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values.sort()
    if total_bits < 8:
        values += [0] * (256 - len(values))
    values.sort()
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.max()


def _original_linear_map(signed=True, total_bits=8, add_zero=True):
    sign = -1.0 if signed else 0.0
    total_values = 2**total_bits
    if add_zero or total_bits < 8:
        total_values = 2**total_bits if not signed else 2**total_bits - 1
    values = torch.linspace(sign, 1.0, total_values)
    gap = 256 - values.numel()
    if gap == 0:
        return values
    half = values.numel() // 2
    return torch.tensor(values[:half].tolist() + [0] * gap + values[half:].tolist(), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# 4-bit tables
# --------------------------------------------------------------------------------------------------------


def test_nf4_table_is_design_value():
    table = F.get_4bit_type("nf4")
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert torch.equal(table, torch.tensor(NF4, dtype=torch.float32))
    assert list(codebooks.NF4_CODE) == NF4
    # sorted, with exactly one zero at index 7, from -1 to 1
    assert table.tolist() == sorted(table.tolist()) and table[7].item() == 0.0 and (table == 0).sum() == 1


def test_fp4_table_is_design_value():
    table = F.get_4bit_type("fp4")
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert torch.equal(table, torch.tensor(FP4, dtype=torch.float32))
    # bit 3 is the sign: codes 8..15 are the negatives of codes 0..7; the largest magnitude (code 3) is 1.0
    assert torch.equal(table[8:], -table[:8])
    assert table[3].item() == 1.0 and table.abs().max().item() == 1.0
    assert list(codebooks.FP4_CODE) == FP4


def test_create_normal_map_gives_nf4():
    normal = F.create_normal_map()
    assert normal.dtype == torch.float32 and normal.shape == (256,)
    nonzero = normal[normal != 0]
    assert nonzero.numel() == 15 and (normal == 0).sum() == 241
    values = torch.cat([nonzero, torch.zeros(1)]).sort().values
    difference = (values.double() - torch.tensor(NF4, dtype=torch.float64)).abs().max().item()
    assert difference == 0.0, f"create_normal_map differs from the NF4 table by up to {difference}"
    assert torch.equal(values, F.get_4bit_type("nf4"))


def test_create_normal_map_without_extra_value_is_symmetric():
    normal = F.create_normal_map(use_extra_value=False)
    nonzero = normal[normal != 0]
    assert normal.shape == (256,) and nonzero.numel() == 14
    assert nonzero.max().item() == 1.0 and nonzero.min().item() == -1.0
    assert torch.equal(nonzero.sort().values, (-nonzero).sort().values)


# --------------------------------------------------------------------------------------------------------
# dynamic map
# --------------------------------------------------------------------------------------------------------


def test_dynamic_map_signed():
    code = F.create_dynamic_map(signed=True)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(code, code.sort().values)
    assert (code == 0).sum().item() == 1 and code[127].item() == 0.0
    assert code.max().item() == 1.0 and code[255].item() == 1.0
    assert code.min().item() == pytest.approx(-0.99297, abs=1e-5)
    assert code.min().item() == pytest.approx(-(1 - 0.9 / 64 / 2), rel=1e-6)  # the last bin mean of [0.1, 1]
    assert ((code >= -0.99297) & (code <= 1.0)).all()
    assert len(set(code.tolist())) == 256  # every code distinct
    # 127 negatives, 128 positives: the negatives mirror all positives but 1.0
    assert torch.equal(-code[:127].flip(0), code[128:255])


def test_dynamic_map_unsigned():
    code = F.create_dynamic_map(signed=False)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(code, code.sort().values)
    assert code[0].item() == 0.0 and (code == 0).sum().item() == 1
    assert code[255].item() == 1.0 and (code >= 0).all()
    assert len(set(code.tolist())) == 256


@pytest.mark.parametrize(
    "signed, max_exponent_bits, total_bits", [(True, 7, 8), (False, 7, 8), (True, 5, 8), (True, 6, 8), (True, 4, 6)]
)
def test_dynamic_map_matches_original_construction(signed, max_exponent_bits, total_bits):
    ours = F.create_dynamic_map(signed, max_exponent_bits, total_bits)
    original = _original_dynamic_map(signed, max_exponent_bits, total_bits)
    if total_bits < 8:
        original = torch.cat([original, torch.zeros(256 - original.numel())]).sort().values
    assert ours.shape == (256,)
    assert torch.equal(_bits(ours), _bits(original))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: F.create_dynamic_map(total_bits=4), r"max_exponent_bits \(7\) must be at most the 3 non-sign bits"),
        (lambda: F.create_normal_map(offset=2.0), r"offset must be in \(0.5, 1\)"),
        (lambda: F.create_normal_map(offset=0.5), r"offset must be in \(0.5, 1\)"),
    ],
)
def test_map_constructors_reject_settings_that_have_no_map(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_quantize_blockwise_default_code_is_signed_dynamic_map():
    _, state = F.quantize_blockwise(torch.randn(100))
    assert torch.equal(_bits(state.code.cpu()), _bits(_original_dynamic_map()))


# --------------------------------------------------------------------------------------------------------
# linear, fp8 maps
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("total_bits, add_zero", [(8, True), (8, False), (4, True)])
def test_linear_map(signed, total_bits, add_zero):
    code = F.create_linear_map(signed=signed, total_bits=total_bits, add_zero=add_zero)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(_bits(code), _bits(_original_linear_map(signed, total_bits, add_zero)))
    assert code.max().item() == 1.0
    assert code.min().item() == (-1.0 if signed else 0.0)
    assert (code == 0).any() == (add_zero or not signed or total_bits < 8)
    nonzero = code[code.abs() > 1e-6].sort().values
    if total_bits == 8 and not (signed and add_zero):
        # 256 evenly spaced values
        steps = nonzero[1:] - nonzero[:-1]
        assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
    elif total_bits == 4:
        expected_nonzero = 14 if signed else 15
        assert nonzero.numel() == expected_nonzero
        steps = nonzero[1:] - nonzero[:-1]
        step = 2 / 14 if signed else 1 / 15
        assert torch.allclose(steps[steps < 1.5 * step], torch.tensor(step), rtol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_fp8_map_properties(signed):
    precision_bits = 2 if signed else 3
    code = F.create_fp8_map(signed=signed, exponent_bits=5, precision_bits=precision_bits)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(code, code.sort().values)
    assert code.max().item() == 1.0 and code[255].item() == 1.0
    if signed:
        assert code.min().item() == -1.0
        assert torch.equal(code.flip(0), -code)  # symmetric
    else:
        assert code.min().item() == 0.0


@pytest.mark.parametrize(
    "signed, exponent_bits, precision_bits, total_bits",
    [(True, 5, 2, 8), (True, 4, 3, 8), (True, 2, 5, 8), (False, 5, 3, 8), (False, 4, 4, 8), (True, 3, 2, 6),
     (True, 2, 1, 4)],
)  # fmt: skip
def test_fp8_map_matches_original_construction(signed, exponent_bits, precision_bits, total_bits):
    ours = F.create_fp8_map(signed, exponent_bits, precision_bits, total_bits)
    original = _original_fp8_map(signed, exponent_bits, precision_bits, total_bits)
    assert torch.equal(_bits(ours), _bits(original))


def test_fp8_map_signed_holds_both_zeros():
    code = F.create_fp8_map(signed=True)
    zeros = code[code == 0]
    assert zeros.numel() == 2
    assert sorted(torch.signbit(zeros).tolist()) == [False, True]


def test_fp8_map_rejects_bits_that_do_not_add_up():
    with pytest.raises(ValueError):
        F.create_fp8_map(signed=True, exponent_bits=5, precision_bits=3, total_bits=8)


def test_fp4_is_not_the_fp8_constructor_with_two_exponent_bits():
    # a fact of the original library (spec gotcha 9): the FP4 table's subnormal is 0.0625/12, not 0.125/6
    small = F.create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4)
    positive = sorted(set(v for v in small.tolist() if v > 0))
    assert positive[0] == pytest.approx(0.125 / 6, rel=1e-6)
    assert FP4[1] == pytest.approx(0.0625 / 12)


# --------------------------------------------------------------------------------------------------------
# estimate_quantiles
# --------------------------------------------------------------------------------------------------------


def _probabilities(num_quantiles=256, offset=1 / 512):
    if num_quantiles < 256 and offset == 1 / 512:
        offset = 1 / (2 * num_quantiles)
    positions = torch.linspace(offset, 1 - offset, 256, dtype=torch.float64)
    if num_quantiles < 256:
        positions = positions[torch.linspace(0, 255, num_quantiles).long()]
    return positions


def test_estimate_quantiles_uniform(device):
    g = torch.Generator().manual_seed(0)
    A = torch.rand(100_000, generator=g).to(device)
    q = F.estimate_quantiles(A)
    assert q.dtype == torch.float32 and q.shape == (256,) and q.device.type == device
    assert torch.equal(q, q.sort().values)
    err = (q.cpu().double() - _probabilities()).abs().max().item()
    assert err < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_estimate_quantiles_normal(device, dtype):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(100_000, generator=g).to(dtype).to(device)
    q = F.estimate_quantiles(A)
    true = torch.special.ndtri(_probabilities())
    err = (q.cpu().double() - true).abs()
    assert err[8:-8].max().item() < 0.03
    assert err.max().item() < 0.15  # the extreme quantiles have high variance


def test_estimate_quantiles_offset_and_out(device):
    g = torch.Generator().manual_seed(2)
    A = torch.rand(50_000, generator=g).to(device)
    out = torch.empty(256, device=device)
    q = F.estimate_quantiles(A, out=out, offset=0.02)
    assert q is out
    assert q[0].item() == pytest.approx(0.02, abs=0.01) and q[-1].item() == pytest.approx(0.98, abs=0.01)
    assert (q.cpu().double() - _probabilities(256, 0.02)).abs().max().item() < 0.01


@pytest.mark.parametrize("num_quantiles", [16, 100, 255])
def test_estimate_quantiles_fewer(device, num_quantiles):
    g = torch.Generator().manual_seed(3)
    A = torch.rand(60_000, generator=g).to(device)
    q = F.estimate_quantiles(A, num_quantiles=num_quantiles)
    # as in the original library: out[linspace(0, 255, n).long()] of 256 quantiles with offset 1 / (2n)
    assert q.shape == (num_quantiles,)
    assert (q.cpu().double() - _probabilities(num_quantiles)).abs().max().item() < 0.01


def _original_single_chunk_quantiles(A: torch.Tensor, offset=1 / 512, num_quantiles=256) -> torch.Tensor:
    """The original CUDA kernel for n <= 4096 (one chunk): order statistic at round-half-away((offset + t*q)*(n-1)),
    computed in float32."""
    if num_quantiles < 256 and offset == 1 / 512:
        offset = 1 / (2 * num_quantiles)
    n = A.numel()
    ordered = A.float().sort().values
    off = torch.tensor(offset, dtype=torch.float32)
    step = (1 - 2 * off) / 255
    out = []
    for t in range(256):
        position = ((off + t * step) * (n - 1)).item()  # float32 arithmetic
        out.append(ordered[int(math.floor(position + 0.5))].item())
    result = torch.tensor(out)
    if num_quantiles < 256:
        result = result[torch.linspace(0, 255, num_quantiles).long()]
    return result


@pytest.mark.parametrize("n", [256, 1000, 4096])
@pytest.mark.parametrize("num_quantiles, offset", [(256, 1 / 512), (256, 0.01), (32, 1 / 512)])
def test_estimate_quantiles_matches_original_for_one_chunk(n, num_quantiles, offset):
    A = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q = F.estimate_quantiles(A, offset=offset, num_quantiles=num_quantiles)
    assert torch.equal(q, _original_single_chunk_quantiles(A, offset, num_quantiles))


def test_estimate_quantiles_bad_input():
    with pytest.raises(ValueError, match="num_quantiles"):
        F.estimate_quantiles(torch.rand(1000), num_quantiles=257)
    with pytest.raises(ValueError, match="empty"):
        F.estimate_quantiles(torch.zeros(0))
