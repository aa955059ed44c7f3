"""The int8 ``lowbit::`` ops against the format facts of DESIGN.md (LLM.int8, vector-wise quantization).

Every kernel test takes ``device``: on a GPU machine the same checks run on the CUDA kernels, and their
outputs are also compared with the CPU op on the same inputs.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import FLOAT_DTYPES, randn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

ops = torch.ops.lowbit
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Tie window: 127 * x / s computed in float32 (as a reciprocal-multiply or a divide) differs from the float64
# value by at most a few float32 ulps of a number <= 127, far below this.
TIE_WINDOW = 1e-4


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _randint8(shape, device, seed, low=-128, high=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8).to(device)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t
    if layout == "noncontiguous":
        return _noncontiguous(t)
    if layout == "transposed":  # a (m, k) view of a (k, m) buffer
        out = t.t().contiguous().t()
        assert not out.is_contiguous() or min(t.shape) == 1
        return out
    raise AssertionError(layout)


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return x


def _assert_matches_cpu(op, args, result, exact=True, rtol=0.0, atol=0.0):
    """On a non-CPU device, the op's outputs equal those of the CPU op on the same inputs."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.device.type == "cpu":
        return
    expected = op(*[_cpu(a) for a in args])
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(results, expecteds, strict=True):
        if exact or not got.is_floating_point():
            assert torch.equal(got.cpu(), want), f"{op} on {first.device} differs from CPU"
        else:
            torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


def _reference_quant(A: torch.Tensor, threshold: float = 0.0):
    """Float64 vector-wise quantization straight from DESIGN.md: (exact q values as float64, row absmax, mask)."""
    rows = A.detach().cpu().double().reshape(-1, A.shape[-1])
    magnitude = rows.abs()
    if threshold > 0:
        outliers = magnitude >= threshold
        mask = outliers.any(0)
        magnitude = magnitude.masked_fill(outliers, 0)
    else:
        mask = torch.zeros(rows.shape[1], dtype=torch.bool)
    absmax = magnitude.amax(1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    exact = torch.where(absmax[:, None] > 0, 127 * rows / absmax[:, None].clamp_min(1e-300), torch.zeros_like(rows))
    exact = exact.masked_fill(mask[None, :], 0)
    return exact, absmax, mask


def _assert_rounded(q: torch.Tensor, exact: torch.Tensor):
    """``q == round(exact)``, except off by one where ``exact`` is (within float32 noise of) a .5 tie."""
    q = q.cpu().reshape(exact.shape).double()
    rounded = torch.round(exact)
    diff = (q - rounded).abs()
    near_tie = ((exact - exact.floor()) - 0.5).abs() < TIE_WINDOW
    bad = (diff > 1) | ((diff == 1) & ~near_tie)
    assert not bad.any(), (
        f"{int(bad.sum())} values differ from round(127*x/absmax); first at {bad.nonzero()[0].tolist()}: "
        f"q={q[bad][0].item()}, exact={exact[bad][0].item()}"
    )


# --------------------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "noncontiguous", "3d"]


def _float_input(shape2d, dtype, device, seed, layout, scale=1.0):
    if layout == "3d":
        m, k = shape2d
        return randn((2, m, k), dtype, device, seed, scale)
    return _layout(randn(shape2d, dtype, device, seed, scale), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threshold", [0.0, 2.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck_int8_vectorwise_quant(device, dtype, threshold, layout):
    A = _float_input((5, 24), dtype, device, seed=1, layout=layout)
    torch.library.opcheck(ops.int8_vectorwise_quant, (A, threshold))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_int8_linear_matmul(device, layout):
    B = _layout(_randint8((8, 32), device, seed=2), "contiguous" if layout == "3d" else layout)
    A = _randint8((2, 5, 32), device, seed=3) if layout == "3d" else _layout(_randint8((5, 32), device, 3), layout)
    torch.library.opcheck(ops.int8_linear_matmul, (A, B))


@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "3d"])
def test_opcheck_int8_mm_dequant(device, dtype, bias_dtype, layout):
    shape = (2, 3, 8) if layout == "3d" else (6, 8)
    A = torch.randint(-(2**20), 2**20, shape, dtype=torch.int32).to(device)
    row_stats = torch.rand(6).add(0.5).to(device)
    col_stats = torch.rand(8).add(0.5).to(device)
    bias = None if bias_dtype is None else torch.randn(8, dtype=bias_dtype, device=device)
    torch.library.opcheck(ops.int8_mm_dequant, (A, row_stats, col_stats, dtype, bias))


@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_int8_scaled_mm(device, dtype, bias_dtype, layout):
    if layout == "3d":
        A = _randint8((2, 3, 16), device, seed=4)
    else:
        A = _layout(_randint8((6, 16), device, seed=4), layout)
    B = _randint8((8, 16), device, seed=5)
    row_stats = torch.rand(6).add(0.5).to(device)
    col_stats = torch.rand(8).add(0.5).to(device)
    bias = None if bias_dtype is None else torch.randn(8, dtype=bias_dtype, device=device)
    torch.library.opcheck(ops.int8_scaled_mm, (A, B, row_stats, col_stats, bias, dtype))


def _with_outlier_columns(A: torch.Tensor, columns, value=20.0) -> torch.Tensor:
    A = A.clone()
    A[..., columns] = torch.where(A[..., columns] >= 0, value, -value).to(A.dtype)
    return A


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck_int8_mixed_linear(device, dtype, threshold, with_bias, layout):
    A = _float_input((5, 32), dtype, device, seed=6, layout="3d" if layout == "3d" else "contiguous")
    A = _with_outlier_columns(A, [3, 17])
    if layout == "noncontiguous":
        A = _noncontiguous(A)
    CB = _randint8((12, 32), device, seed=7)
    SCB = torch.rand(12).add(0.1).to(device)
    bias = torch.randn(12, dtype=dtype, device=device) if with_bias else None
    torch.library.opcheck(ops.int8_mixed_linear, (A, CB, SCB, bias, threshold))


# --------------------------------------------------------------------------------------------------------
# int8_vectorwise_quant: format facts
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "transposed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_row_absmax_and_rounding(device, dtype, layout):
    A = _layout(randn((33, 70), dtype, device, seed=10, scale=3.0), layout)
    q, row_stats, mask = ops.int8_vectorwise_quant(A)
    assert q.dtype == torch.int8 and q.shape == A.shape
    assert row_stats.dtype == torch.float32 and row_stats.shape == (33,)
    assert mask.dtype == torch.bool and mask.shape == (70,) and not mask.any()
    exact, absmax, _ = _reference_quant(A)
    assert torch.equal(row_stats.cpu().double(), absmax)  # the absmax of a row is exact in every dtype
    _assert_rounded(q, exact)
    # the absmax element of each row quantizes to +-127
    assert torch.equal(q.cpu().abs().amax(1), torch.full((33,), 127, dtype=torch.int8))
    _assert_matches_cpu(ops.int8_vectorwise_quant, (A, 0.0), (q, row_stats, mask))


def test_vectorwise_quant_exact_ties_round_half_to_even(device):
    # absmax 127: x * 127 / 127 is exactly representable, so the ties are exact .5
    A = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.25, -126.5]], device=device)
    q, row_stats, _ = ops.int8_vectorwise_quant(A)
    assert row_stats.tolist() == [127.0]
    exact, _, _ = _reference_quant(A)
    _assert_rounded(q, exact)
    assert q[0, 0].item() == 127 and q[0, 6].item() == 3


@settings(HYPOTHESIS)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 5e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_vectorwise_quant_property(device, rows, cols, dtype, scale, seed):
    A = randn((rows, cols), dtype, device, seed, scale)
    q, row_stats, mask = ops.int8_vectorwise_quant(A)
    exact, absmax, _ = _reference_quant(A)
    assert torch.equal(row_stats.cpu().double(), absmax)
    _assert_rounded(q, exact)
    assert not mask.any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_threshold_semantics(device, dtype):
    t = 6.0
    A = randn((9, 40), dtype, device, seed=11, scale=1.5).clamp(-5.5, 5.5)
    A[2, 5] = 7.0  # a single outlier in column 5
    A[0, 11] = -6.0  # exactly the threshold counts: |x| >= t
    A[:, 30] = torch.linspace(-12, 12, 9, dtype=dtype)  # a column with several outliers and non-outliers
    A[4, 20] = 5.9375  # just below the threshold (exact in every dtype): not an outlier
    q, row_stats, mask = ops.int8_vectorwise_quant(A, t)
    expected_mask = (A.cpu().abs() >= t).any(0)
    assert torch.equal(mask.cpu(), expected_mask)
    assert mask.nonzero().view(-1).tolist() == [5, 11, 30]
    exact, absmax, _ = _reference_quant(A, t)
    assert torch.equal(row_stats.cpu().double(), absmax)  # outliers left out of the row absmax
    assert row_stats[2].item() <= 5.5 and row_stats[4].item() == 5.9375
    assert (q.cpu()[:, expected_mask] == 0).all()
    _assert_rounded(q, exact)
    _assert_matches_cpu(ops.int8_vectorwise_quant, (A, t), (q, row_stats, mask))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_threshold_zeroes_whole_outlier_columns(device, dtype):
    t = 6.0
    A = randn((7, 32), dtype, device, seed=12).clamp(-4, 4)
    A[3, 5] = 9.0
    A[6, 17] = -100.0
    A[0, 17] = 6.0
    q, row_stats, mask = ops.int8_vectorwise_quant(A, t)
    assert mask.nonzero().view(-1).tolist() == [5, 17]
    # whole columns are zero, not just the outlier elements
    assert (q[:, 5] == 0).all() and (q[:, 17] == 0).all()
    exact, absmax, _ = _reference_quant(A, t)
    # outliers are left out of their row's absmax
    assert torch.equal(row_stats.cpu().double(), absmax)
    assert row_stats[6].item() == A[6].float().abs().masked_fill(A[6].float().abs() >= t, 0).amax().item()
    _assert_rounded(q, exact)  # non-outlier columns are quantized with the outlier-free absmax
    # without outliers, threshold > 0 is the same as threshold 0
    B = A.clamp(-5, 5)
    q0, s0, m0 = ops.int8_vectorwise_quant(B)
    q6, s6, m6 = ops.int8_vectorwise_quant(B, t)
    assert torch.equal(q0, q6) and torch.equal(s0, s6) and not m6.any()


@settings(HYPOTHESIS)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 24),
    threshold=st.sampled_from([0.5, 1.0, 2.5, 6.0]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_vectorwise_quant_threshold_property(device, rows, cols, threshold, seed, dtype):
    A = randn((rows, cols), dtype, device, seed, scale=2.0)
    q, row_stats, mask = ops.int8_vectorwise_quant(A, threshold)
    exact, absmax, expected_mask = _reference_quant(A, threshold)
    assert torch.equal(mask.cpu(), expected_mask)
    assert torch.equal(row_stats.cpu().double(), absmax)
    _assert_rounded(q, exact)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_zero_rows(device, dtype, threshold):
    A = randn((4, 16), dtype, device, seed=13)
    A[1] = 0
    A[3] = 0
    q, row_stats, mask = ops.int8_vectorwise_quant(A, threshold)
    assert row_stats[1].item() == 0 and row_stats[3].item() == 0
    assert not torch.isnan(row_stats).any()
    assert (q[1] == 0).all() and (q[3] == 0).all()
    Z = torch.zeros(3, 8, dtype=dtype, device=device)
    qz, sz, mz = ops.int8_vectorwise_quant(Z, threshold)
    assert (qz == 0).all() and (sz == 0).all() and not mz.any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_row_of_outliers_only(device, dtype):
    A = randn((3, 8), dtype, device, seed=16).clamp(-2, 2)
    A[1] = 50.0
    q, row_stats, mask = ops.int8_vectorwise_quant(A, 6.0)
    assert row_stats[1].item() == 0 and not torch.isnan(row_stats).any()
    assert mask.all() and (q == 0).all()


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_vectorwise_quant_3d_is_rowwise_over_flattened_rows(device, threshold):
    A = randn((2, 3, 20), torch.float16, device, seed=14, scale=1.5)
    q, row_stats, mask = ops.int8_vectorwise_quant(A, threshold)
    q2, row_stats2, mask2 = ops.int8_vectorwise_quant(A.reshape(6, 20), threshold)
    assert q.shape == (2, 3, 20) and row_stats.shape == (6,) and mask.shape == (20,)
    assert torch.equal(q.reshape(6, 20), q2) and torch.equal(row_stats, row_stats2) and torch.equal(mask, mask2)


def test_vectorwise_quant_does_not_modify_input(device):
    A = _with_outlier_columns(randn((4, 16), torch.float16, device, seed=15), [2])
    before = A.clone()
    ops.int8_vectorwise_quant(A, 6.0)
    assert torch.equal(A, before)


# --------------------------------------------------------------------------------------------------------
# int8_linear_matmul / int8_mm_dequant / int8_scaled_mm
# --------------------------------------------------------------------------------------------------------


def _int64_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (A.cpu().long().reshape(-1, A.shape[-1]) @ B.cpu().long().t()).view(*A.shape[:-1], B.shape[0])


@pytest.mark.parametrize(
    "a_shape, n",
    [((1, 7), 3), ((5, 64), 32), ((17, 33), 9), ((32, 128), 48), ((2, 3, 24), 8), ((4, 1, 16), 16)],
)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_int8_linear_matmul_exact(device, a_shape, n, layout):
    k = a_shape[-1]
    A = _randint8(a_shape, device, seed=20)
    B = _randint8((n, k), device, seed=21)
    A, B = _layout(A, layout), _layout(B, layout)
    out = ops.int8_linear_matmul(A, B)
    assert out.dtype == torch.int32 and out.shape == (*a_shape[:-1], n)
    assert torch.equal(out.cpu().long(), _int64_matmul(A, B))
    _assert_matches_cpu(ops.int8_linear_matmul, (A, B), out)


def test_int8_linear_matmul_extremes(device):
    # -128 * -128 * k: the largest products int32 accumulation must hold
    k = 4096
    A = torch.full((2, k), -128, dtype=torch.int8, device=device)
    B = torch.full((3, k), -128, dtype=torch.int8, device=device)
    B[1] = 127
    out = ops.int8_linear_matmul(A, B)
    assert out[:, 0].tolist() == [128 * 128 * k] * 2
    assert out[:, 1].tolist() == [-128 * 127 * k] * 2


@pytest.mark.parametrize("m, n", [(1, 2), (3, 5), (17, 8)])
def test_int8_linear_matmul_k_equals_one(device, m, n):
    A = _randint8((m, 1), device, seed=25, low=1)
    B = _randint8((n, 1), device, seed=26, low=1)
    assert torch.equal(ops.int8_linear_matmul(A, B).cpu().long(), _int64_matmul(A, B))


@settings(HYPOTHESIS)
@given(m=st.integers(1, 20), k=st.integers(2, 40), n=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_int8_linear_matmul_property(device, m, k, n, seed):
    A = _randint8((m, k), device, seed)
    B = _randint8((n, k), device, seed + 1)
    assert torch.equal(ops.int8_linear_matmul(A, B).cpu().long(), _int64_matmul(A, B))


def _dequant_reference(C, row_stats, col_stats, bias):
    """Float64 ``C * row * col / 127**2 + bias`` and the magnitude of its terms (for rounding tolerances)."""
    ref = C.cpu().double().reshape(-1, C.shape[-1]) * row_stats.cpu().double()[:, None]
    ref = ref * col_stats.cpu().double()[None, :] / 127**2
    magnitude = ref.abs()
    if bias is not None:
        ref = ref + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    return ref.view(C.shape), magnitude.view(C.shape)


F32_EPS = torch.finfo(torch.float32).eps


def _assert_close_in_dtype(got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, magnitude=None, ulps=1.0):
    """``got`` (of ``dtype``) is ``ref64`` rounded to ``dtype`` (``ulps`` units of its precision), after a float32
    computation whose own rounding (a few float32 ulps of the terms' ``magnitude``) is allowed for as well."""
    assert got.dtype == dtype
    got64 = got.cpu().double()
    magnitude = ref64.abs() if magnitude is None else magnitude
    tol = ulps * _eps(dtype) * ref64.abs() + 8 * F32_EPS * magnitude + 1e-30
    err = (got64 - ref64).abs()
    assert (err <= tol).all(), f"max error {err.max().item()} (tolerance {tol.view(-1)[err.argmax()].item()})"


@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 12)])
def test_int8_mm_dequant_values(device, shape, dtype, bias_dtype):
    g = torch.Generator().manual_seed(22)
    C = torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int32).to(device)
    rows = math.prod(shape[:-1])
    row_stats = (torch.rand(rows, generator=g) * 3 + 0.1).to(device)
    col_stats = (torch.rand(12, generator=g) * 3 + 0.1).to(device)
    bias = None if bias_dtype is None else (torch.randn(12, generator=g) * 4).to(bias_dtype).to(device)
    out = ops.int8_mm_dequant(C, row_stats, col_stats, dtype, bias)
    assert out.shape == shape
    ref, magnitude = _dequant_reference(C, row_stats, col_stats, bias)
    _assert_close_in_dtype(out, ref, dtype or torch.float16, magnitude)
    _assert_matches_cpu(ops.int8_mm_dequant, (C, row_stats, col_stats, dtype, bias), out, exact=False,
                        rtol=_eps(dtype or torch.float16), atol=1e-5)  # fmt: skip


def test_int8_mm_dequant_default_dtype_is_float16(device):
    C = torch.tensor([[127 * 127, -2 * 127 * 127]], dtype=torch.int32, device=device)
    out = ops.int8_mm_dequant(C, torch.ones(1, device=device), torch.tensor([1.0, 0.5], device=device))
    assert out.dtype == torch.float16
    assert out.tolist() == [[1.0, -1.0]]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("a_shape", [(5, 40), (2, 3, 40), (1, 40)])
def test_int8_scaled_mm_is_the_composition(device, a_shape, dtype, with_bias):
    A = _randint8(a_shape, device, seed=23)
    B = _randint8((24, 40), device, seed=24)
    rows = math.prod(a_shape[:-1])
    row_stats = torch.rand(rows).add(0.1).to(device)
    col_stats = torch.rand(24).add(0.1).to(device)
    bias = torch.randn(24, dtype=torch.float16, device=device) if with_bias else None
    out = ops.int8_scaled_mm(A, B, row_stats, col_stats, bias, dtype)
    composed = ops.int8_mm_dequant(ops.int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias)
    assert out.dtype == (dtype or torch.float16) and out.shape == (*a_shape[:-1], 24)
    torch.testing.assert_close(out, composed, rtol=_eps(out.dtype), atol=1e-6)
    ref, magnitude = _dequant_reference(_int64_matmul(A, B), row_stats, col_stats, bias)
    _assert_close_in_dtype(out, ref, dtype or torch.float16, magnitude)


def _assert_same(got: torch.Tensor, want: torch.Tensor, exact: bool):
    if exact:
        assert torch.equal(got, want), f"max difference {(got.double() - want.double()).abs().max().item()}"
    else:
        torch.testing.assert_close(got, want, rtol=_eps(got.dtype), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, n, k", [(64, 25600, 128), (200, 13000, 144), (300, 8717, 272), (1100, 3000, 160)])
def test_int8_scaled_mm_many_rows_is_the_composition(device, rows, n, k, dtype):
    # From 64 rows, with 128 x 256 tiles for 40% of the SMs or more (these shapes: 100-108), a Hopper GPU takes the
    # fused wgmma kernel (epilogue in registers), while the composition takes cuBLAS' int32 product and the epilogue
    # kernel: on CUDA the bits must agree. The shapes leave partial tiles of rows, columns and k (128), and an odd n;
    # the kernel's 2-CTA clusters pair tiles along B's rows (1 and 3 tiles of rows; 35 tiles of columns leave one
    # past B) or along A's (2 and 9 tiles: one past A).
    A = _randint8((rows, k), device, seed=40)
    B = _randint8((n, k), device, seed=41)
    g = torch.Generator().manual_seed(42)
    row_stats = (torch.rand(rows, generator=g) * 3 + 0.1).to(device)
    col_stats = (torch.rand(n, generator=g) * 3 + 0.1).to(device)
    bias = torch.randn(n, generator=g).to(device)
    out = ops.int8_scaled_mm(A, B, row_stats, col_stats, bias, dtype)
    composed = ops.int8_mm_dequant(ops.int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    _assert_same(out, composed, exact=device == "cuda")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="the kernel is for Hopper"
)
@pytest.mark.parametrize("share, fused", [(0.45, True), (0.25, False)])
def test_int8_wgmma_kernel_runs_where_its_tiles_cover_enough_sms(share, fused):
    # From 64 rows, 128 x 256 tiles for at least 40% of the SMs take the fused kernel; fewer take cuBLAS and the
    # epilogue kernel (measured faster there).
    n = 256 * max(1, round(share * torch.cuda.get_device_properties(0).multi_processor_count))
    A, B = _randint8((128, 256), "cuda", seed=50), _randint8((n, 256), "cuda", seed=51)
    stats = torch.ones(128, device="cuda"), torch.ones(n, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.int8_scaled_mm(A, B, *stats, None, torch.float16)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any("int8_wgmma_kernel" in name for name in names) == fused, sorted(names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels read the override")
def test_bad_int8_wgmma_override_raises():
    # The rows from which the int8 wgmma kernel runs, read once per process: a value that is not a non-negative
    # integer is a ValueError naming the variable, not silently the default.
    script = """
import torch, torchlowbit
A = torch.ones(64, 256, dtype=torch.int8, device="cuda")
stats = torch.ones(64, device="cuda")
try:
    torch.ops.lowbit.int8_scaled_mm(A, A, stats, stats, None, torch.float16)
except ValueError as error:
    assert "TORCHLOWBIT_INT8_WGMMA_MIN_M" in str(error), str(error)
    print("raised")
"""
    env = {**os.environ, "TORCHLOWBIT_INT8_WGMMA_MIN_M": "-1"}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip() == "raised", child.stdout[-2000:] + child.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------
# int8_mixed_linear
# --------------------------------------------------------------------------------------------------------


def _int8_weight(n, k, device, seed):
    """A row-wise int8 weight (CB, SCB) and its float64 dequantized value CB * SCB / 127."""
    W = randn((n, k), torch.float32, device, seed, scale=0.5)
    SCB = W.abs().amax(1)
    CB = torch.round(W * (127 / SCB)[:, None]).to(torch.int8)
    dequantized = CB.cpu().double() * SCB.cpu().double()[:, None] / 127
    return CB, SCB, dequantized


def _int8_error_bound(A: torch.Tensor, weight64: torch.Tensor, dtype: torch.dtype, ref: torch.Tensor):
    """Worst-case error of row-wise int8 A: each element is off by at most absmax/127/2, plus output rounding."""
    rows = A.cpu().double().reshape(-1, A.shape[-1])
    quant = (rows.abs().amax(1) / 254)[:, None] * weight64.abs().sum(1)[None, :]
    return (quant * (1.001 + _eps(dtype)) + 2 * _eps(dtype) * ref.abs().reshape(quant.shape) + 1e-6).view(ref.shape)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("a_shape", [(1, 64), (9, 64), (2, 5, 64)])
def test_int8_mixed_linear_threshold_zero(device, a_shape, dtype, with_bias):
    A = randn(a_shape, dtype, device, seed=30)
    CB, SCB, W64 = _int8_weight(20, 64, device, seed=31)
    bias = randn((20,), dtype, device, seed=32) if with_bias else None
    out, mask = ops.int8_mixed_linear(A, CB, SCB, bias, 0.0)
    assert out.dtype == dtype and out.shape == (*a_shape[:-1], 20)
    assert mask.dtype == torch.bool and mask.shape == (64,) and not mask.any()
    ref = A.cpu().double() @ W64.T
    if bias is not None:
        ref = ref + bias.cpu().double()
    err = (out.cpu().double() - ref).abs()
    bound = _int8_error_bound(A, W64, dtype, ref)
    assert (err <= bound).all(), f"max error {err.max().item()}, bound there {bound.view(-1)[err.argmax()].item()}"
    # it is LLM.int8 without outliers: the int8 product of the row-quantized A, in A's dtype
    CA, SCA, _ = ops.int8_vectorwise_quant(A)
    composed = ops.int8_scaled_mm(CA, CB, SCA, SCB, bias, dtype)
    torch.testing.assert_close(out, composed, rtol=2 * _eps(dtype), atol=2 * _eps(dtype))
    _assert_matches_cpu(ops.int8_mixed_linear, (A, CB, SCB, bias, 0.0), (out, mask), exact=False,
                        rtol=2 * _eps(dtype), atol=2 * _eps(dtype))  # fmt: skip


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("a_shape", [(1, 96), (16, 96), (2, 4, 96)])
def test_int8_mixed_linear_outlier_decomposition(device, a_shape, dtype):
    t = 6.0
    outlier_columns = [4, 50, 91]
    A = randn(a_shape, dtype, device, seed=33).clamp(-3, 3)
    g = torch.Generator().manual_seed(34)
    big = (torch.rand(*a_shape[:-1], 3, generator=g) * 60 + 8) * torch.sign(torch.randn(*a_shape[:-1], 3, generator=g))
    A[..., outlier_columns] = big.to(dtype).to(device)
    CB, SCB, W64 = _int8_weight(32, 96, device, seed=35)
    ref = A.cpu().double() @ W64.T
    out_t, mask = ops.int8_mixed_linear(A, CB, SCB, None, t)
    out_0, mask_0 = ops.int8_mixed_linear(A, CB, SCB, None, 0.0)
    assert out_t.dtype == dtype and out_t.shape == ref.shape
    assert mask.nonzero().view(-1).tolist() == outlier_columns and not mask_0.any()
    err_t = (out_t.cpu().double() - ref).abs().max().item()
    err_0 = (out_0.cpu().double() - ref).abs().max().item()
    assert err_t < err_0 / 5, f"with decomposition {err_t}, without {err_0}"
    # the non-outlier part is the int8 product of A with its outlier columns removed; the outlier columns
    # are added in floating point against the dequantized weight columns
    inliers = A.clone()
    inliers[..., outlier_columns] = 0
    int8_part, _ = ops.int8_mixed_linear(inliers, CB, SCB, None, 0.0)
    float_part = A.cpu().double()[..., outlier_columns] @ W64[:, outlier_columns].T
    float_magnitude = A.cpu().double()[..., outlier_columns].abs() @ W64[:, outlier_columns].abs().T
    expected = int8_part.cpu().double() + float_part
    tol = 2 * _eps(dtype) * (int8_part.cpu().double().abs() + float_magnitude) + 1e-6
    assert ((out_t.cpu().double() - expected).abs() <= tol).all()
    _assert_matches_cpu(ops.int8_mixed_linear, (A, CB, SCB, None, t), (out_t, mask), exact=False,
                        rtol=3 * _eps(dtype), atol=3 * _eps(dtype) * 50)  # fmt: skip


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("outliers", [3, 70])
@pytest.mark.parametrize("rows, n", [(192, 12800), (300, 8900), (1100, 3072)])
def test_int8_mixed_linear_many_rows_is_row_chunks(device, dtype, outliers, rows, n):
    # These rows (100-108 tiles) take the fused wgmma kernel on Hopper, chunks of 32 rows cuBLAS and the epilogue
    # kernel. With the same outlier columns in every row (70: more than the 16 the kernel gathers ahead) their bits must
    # agree, whichever way the kernel's clusters pair the tiles (300 rows: along B, one tile past it).
    k = 256
    A = randn((rows, k), dtype, device, seed=43).clamp(-3, 3)
    g = torch.Generator().manual_seed(44)
    columns = torch.randperm(k, generator=g)[:outliers]
    big = (torch.rand(rows, outliers, generator=g) * 60 + 8) * torch.randn(rows, outliers, generator=g).sign()
    A[:, columns] = big.to(dtype).to(device)
    CB, SCB, _ = _int8_weight(n, k, device, seed=45)
    bias = randn((n,), dtype, device, seed=46)
    out, mask = ops.int8_mixed_linear(A, CB, SCB, bias, 6.0)
    assert sorted(mask.nonzero().view(-1).tolist()) == sorted(columns.tolist())
    chunks = torch.cat([ops.int8_mixed_linear(A[r : r + 32], CB, SCB, bias, 6.0)[0] for r in range(0, rows, 32)])
    _assert_same(out, chunks, exact=device == "cuda")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_mixed_linear_outlier_columns_are_floating_point(device, dtype):
    # only outlier columns are non-zero: an int8 product would be off by up to absmax/254 per element,
    # the floating-point product only by the output rounding
    t = 6.0
    A = torch.zeros(6, 64, dtype=dtype)
    g = torch.Generator().manual_seed(36)
    A[:, [1, 2, 40]] = (torch.rand(6, 3, generator=g) * 100 + 7).to(dtype)
    A[:, 2].neg_()
    A = A.to(device)
    CB, SCB, W64 = _int8_weight(16, 64, device, seed=37)
    bias = randn((16,), dtype, device, seed=38)
    out, mask = ops.int8_mixed_linear(A, CB, SCB, bias, t)
    ref = A.cpu().double() @ W64.T + bias.cpu().double()
    magnitude = A.cpu().double().abs() @ W64.abs().T + bias.cpu().double().abs()
    _assert_close_in_dtype(out, ref, dtype, magnitude, ulps=2)
    assert mask.nonzero().view(-1).tolist() == [1, 2, 40]


def test_int8_mixed_linear_no_outliers_same_as_threshold_zero(device):
    A = randn((8, 48), torch.float16, device, seed=39).clamp(-4, 4)
    CB, SCB, _ = _int8_weight(10, 48, device, seed=40)
    out_0, _ = ops.int8_mixed_linear(A, CB, SCB, None, 0.0)
    out_6, mask = ops.int8_mixed_linear(A, CB, SCB, None, 6.0)
    assert not mask.any()
    assert torch.equal(out_0, out_6)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_mixed_linear_output_dtype_is_input_dtype(device, dtype, bias_dtype):
    A = randn((3, 16), dtype, device, seed=41)
    CB, SCB, _ = _int8_weight(5, 16, device, seed=42)
    bias = randn((5,), bias_dtype, device, seed=43)
    for threshold in (0.0, 0.5):
        out, _ = ops.int8_mixed_linear(A, CB, SCB, bias, threshold)
        assert out.dtype == dtype


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_mixed_linear_output_shape_depends_only_on_input_shapes(device, threshold):
    CB, SCB, _ = _int8_weight(12, 32, device, seed=44)
    base = randn((2, 7, 32), torch.float16, device, seed=45).clamp(-3, 3)
    shapes = set()
    for columns in ([], [0], [1, 2, 3, 30]):
        A = _with_outlier_columns(base, columns) if columns else base
        out, mask = ops.int8_mixed_linear(A, CB, SCB, None, threshold)
        shapes.add((tuple(out.shape), tuple(mask.shape)))
    assert shapes == {((2, 7, 12), (32,))}
    real = (base.cpu(), CB.cpu(), SCB.cpu())  # made outside the mode: under it, .cpu() would be traced too
    with FakeTensorMode() as mode:
        fake_A, fake_CB, fake_SCB = (mode.from_tensor(t) for t in real)
        fake_out, fake_mask = ops.int8_mixed_linear(fake_A, fake_CB, fake_SCB, None, threshold)
        assert fake_out.shape == (2, 7, 12) and fake_out.dtype == torch.float16
        assert fake_mask.shape == (32,) and fake_mask.dtype == torch.bool


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------


def test_vectorwise_quant_bad_input():
    with pytest.raises(TypeError, match="A"):
        ops.int8_vectorwise_quant(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="A"):
        ops.int8_vectorwise_quant(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        ops.int8_vectorwise_quant(torch.zeros(2, 3), -1.0)
    with pytest.raises(ValueError, match="A"):
        ops.int8_vectorwise_quant(torch.tensor(1.0))


def test_linear_matmul_bad_input():
    A = torch.zeros(4, 8, dtype=torch.int8)
    B = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="A"):
        ops.int8_linear_matmul(A.float(), B)
    with pytest.raises(TypeError, match="B"):
        ops.int8_linear_matmul(A, B.int())
    with pytest.raises(ValueError, match=r"A must be \(\.\.\., k\) and B \(n, k\)"):
        ops.int8_linear_matmul(A, torch.zeros(3, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="B"):
        ops.int8_linear_matmul(A, torch.zeros(1, 3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"A on cpu, B on meta"):
        ops.int8_linear_matmul(A, B.to("meta"))


def test_mm_dequant_bad_input():
    C = torch.zeros(4, 3, dtype=torch.int32)
    row, col = torch.ones(4), torch.ones(3)
    with pytest.raises(TypeError, match="A"):
        ops.int8_mm_dequant(C.to(torch.int8), row, col)
    with pytest.raises(TypeError, match="row_stats"):
        ops.int8_mm_dequant(C, row.half(), col)
    with pytest.raises(TypeError, match="col_stats"):
        ops.int8_mm_dequant(C, row, col.double())
    with pytest.raises(ValueError, match="row_stats"):
        ops.int8_mm_dequant(C, torch.ones(5), col)
    with pytest.raises(ValueError, match="col_stats"):
        ops.int8_mm_dequant(C, row, torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        ops.int8_mm_dequant(C, row, col, None, torch.ones(4))
    with pytest.raises(TypeError, match="bias"):
        ops.int8_mm_dequant(C, row, col, None, torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        ops.int8_mm_dequant(C, row, col, torch.int8)
    with pytest.raises(ValueError, match=r"A on cpu, row_stats on cpu, col_stats on meta"):
        ops.int8_mm_dequant(C, row, col.to("meta"))
    with pytest.raises(ValueError, match=r"bias on meta"):
        ops.int8_mm_dequant(C, row, col, None, torch.ones(3, device="meta"))


def test_scaled_mm_bad_input():
    A = torch.zeros(4, 8, dtype=torch.int8)
    B = torch.zeros(3, 8, dtype=torch.int8)
    row, col = torch.ones(4), torch.ones(3)
    with pytest.raises(TypeError, match="A"):
        ops.int8_scaled_mm(A.half(), B, row, col)
    with pytest.raises(TypeError, match="B"):
        ops.int8_scaled_mm(A, B.half(), row, col)
    with pytest.raises(ValueError, match=r"A must be \(\.\.\., k\) and B \(n, k\)"):
        ops.int8_scaled_mm(A, torch.zeros(3, 7, dtype=torch.int8), row, col)
    with pytest.raises(ValueError, match="row_stats"):
        ops.int8_scaled_mm(A, B, torch.ones(3), col)
    with pytest.raises(ValueError, match="col_stats"):
        ops.int8_scaled_mm(A, B, row, torch.ones(8))
    with pytest.raises(TypeError, match="row_stats"):
        ops.int8_scaled_mm(A, B, row.bfloat16(), col)
    with pytest.raises(ValueError, match="bias"):
        ops.int8_scaled_mm(A, B, row, col, torch.ones(8))
    with pytest.raises(TypeError, match="dtype"):
        ops.int8_scaled_mm(A, B, row, col, None, torch.int32)
    with pytest.raises(ValueError, match=r"A on cpu, B on meta"):
        ops.int8_scaled_mm(A, B.to("meta"), row, col)
    with pytest.raises(ValueError, match=r"row_stats on meta"):
        ops.int8_scaled_mm(A, B, row.to("meta"), col)


def test_mixed_linear_bad_input():
    A = torch.zeros(4, 8, dtype=torch.float16)
    CB = torch.zeros(3, 8, dtype=torch.int8)
    SCB = torch.ones(3)
    with pytest.raises(TypeError, match="A"):
        ops.int8_mixed_linear(A.to(torch.int8), CB, SCB)
    with pytest.raises(TypeError, match="CB"):
        ops.int8_mixed_linear(A, CB.half(), SCB)
    with pytest.raises(TypeError, match="SCB"):
        ops.int8_mixed_linear(A, CB, SCB.half())
    with pytest.raises(ValueError, match="SCB"):
        ops.int8_mixed_linear(A, CB, torch.ones(4))
    with pytest.raises(ValueError, match="CB"):
        ops.int8_mixed_linear(A, torch.zeros(3, 9, dtype=torch.int8), SCB)
    with pytest.raises(ValueError, match="bias"):
        ops.int8_mixed_linear(A, CB, SCB, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias"):
        ops.int8_mixed_linear(A, CB, SCB, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="threshold"):
        ops.int8_mixed_linear(A, CB, SCB, None, -6.0)
    with pytest.raises(ValueError, match=r"A on meta, CB on cpu, SCB on cpu"):
        ops.int8_mixed_linear(A.to("meta"), CB, SCB)
    with pytest.raises(ValueError, match=r"SCB on meta"):
        ops.int8_mixed_linear(A, CB, SCB.to("meta"))
    with pytest.raises(ValueError, match=r"bias on meta"):
        ops.int8_mixed_linear(A, CB, SCB, torch.ones(3, dtype=torch.float16, device="meta"))


def test_int8_mixed_linear_gradients(device):
    W = torch.randn(48, 64, device=device)
    CB, SCB, _ = torch.ops.lowbit.int8_vectorwise_quant(W)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    bias = torch.randn(48, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowbit.int8_mixed_linear.default, (x, CB, SCB, bias, 2.0))
    out, _ = torch.ops.lowbit.int8_mixed_linear(x, CB, SCB, bias, 2.0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ (CB.float() * SCB[:, None] / 127))
    torch.testing.assert_close(bias.grad, grad.sum((0, 1)))
