"""The CUDA kernel of lowbit::gemm_4bit (csrc/gemm_4bit.cu) against a float64 product of the reference's weights.

A 16-bit A multiplies weights rounded to A's dtype (the fused kernel rounds the 16 code values and applies the
float32 absmax after the product; the wgmma kernel and the dequantize path round code * absmax), with float32
accumulation: every
output must lie within its final rounding plus that weight rounding and float32 accumulation error. A float32 A
runs the reference's float32 weights through cuBLAS.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit import codebooks
from torchlowbit.ops import CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS
from torchlowbit.ops.quantize_4bit import decode, decode_absmax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]
QUANT_TYPES = ["nf4", "fp4"]
# half an ulp of the output dtype, relative
ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
# float32 accumulation, relative to sum |a| |w|
ACCUMULATION = 2.0**-16


def _weight(shape, blocksize, storage, nested, seed, nested_blocksize=256):
    """Random packed bytes (every nibble value) in ``storage`` with a float32 or double-quantized absmax."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    count = math.ceil(math.ceil(numel / 2) / storage.itemsize)
    packed = torch.randint(0, 256, (count * storage.itemsize,), dtype=torch.uint8, generator=g)
    packed = packed.view(storage).view(count, 1)
    nblocks = -(-numel // blocksize)
    absmax = torch.rand(nblocks, generator=g) * 3 + 0.01
    if not nested:
        return packed, absmax, {}
    qabsmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
    nested_absmax = torch.rand(-(-nblocks // nested_blocksize), generator=g) + 0.5
    extra = dict(
        nested_absmax=nested_absmax,
        nested_code=codebooks.create_dynamic_map(),
        nested_offset=torch.tensor([0.123456789123]),
        nested_blocksize=nested_blocksize,
    )
    return packed, qabsmax, extra


def _cuda(kwargs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _check(A, packed, absmax, blocksize, quant_type, shape, bias=None, fused=None, **extra):
    """Run the op on CUDA; compare every element with the float64 product of the reference's weights."""
    out = torch.ops.lowbit.gemm_4bit(
        A if A.is_cuda else A.cuda(), packed.cuda(), absmax.cuda(), blocksize, quant_type, shape,
        None if bias is None else bias.cuda(), **_cuda(extra),
    )  # fmt: skip
    assert out.dtype == A.dtype and out.shape == (*A.shape[:-1], shape[0]) and out.is_cuda
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    nested = {k: v for k, v in extra.items() if k != "nested_blocksize"}
    absmax_f = decode_absmax(
        absmax, nested.get("nested_absmax"), nested.get("nested_code"), nested.get("nested_offset"),
        extra.get("nested_blocksize", 256),
    )  # fmt: skip
    W = decode(packed, absmax_f, blocksize, quant_type, math.prod(shape)).view(shape).double()
    a = A.cpu().double()
    ref = a @ W.T
    scale = a.abs() @ W.abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    if fused is None:
        fused = A.dtype != torch.float32 and shape[1] % 32 == 0 and math.prod(A.shape[:-1]) <= 32
    weight_rounding = 0.0 if A.dtype == torch.float32 else ROUNDING[A.dtype]
    if A.dtype != torch.float32 and bias is not None and not fused:
        weight_rounding += ROUNDING[A.dtype]  # the bias rounded to A's dtype for cuBLAS
    tol = 1.01 * ROUNDING[A.dtype] * ref.abs() + (ACCUMULATION + weight_rounding) * scale + 1e-30
    err = (out - ref).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst err/tol {float((err / tol).max()):.3g}"
    )
    return out


def _activations(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------------
# Registration


def test_cuda_runs_native_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lowbit::gemm_4bit", "CUDA"), CUDA_EXTENSION_STATUS
    assert "gemm_4bit" not in CUDA_REFERENCE_OPS, f"gemm_4bit runs the reference on CUDA: {CUDA_EXTENSION_STATUS}"


# ------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("m", [1, 2, 4, 7, 16, 33, 300])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(dtype, quant_type, nested, m):
    # (out, in): several row groups with a partial last one; in = 320 gives 8-byte quads and a partial last
    # iteration (m <= 4 splits rows into 2-8 k-segments, some past in), 96 4-byte quads (gcd with the
    # blocksize), 1024 several iterations; 300 is not a multiple of 32. m = 1, 2, 4 and 7 take 8, 4, 2 and 1
    # segments.
    for i, shape in enumerate([(200, 320), (77, 96), (33, 1024), (40, 300)]):
        packed, absmax, extra = _weight(shape, 64, torch.uint8, nested, seed=17 * m + i)
        A = _activations((m, shape[1]), dtype, seed=m + 100 * i)
        _check(A, packed, absmax, 64, quant_type, shape, **extra)


@pytest.mark.parametrize("m", [1, 20])
def test_more_row_tiles_than_ctas(m):
    # 20008 rows make several row tiles (2-16 rows times 1-8 warps) a CTA of the persistent grid on current GPUs
    # (an H200 fits 264 CTAs), so CTAs loop over tiles; the last tile is partial.
    shape = (20008, 192)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=m)
    _check(_activations((m, shape[1]), torch.bfloat16, seed=m), packed, absmax, 64, "nf4", shape, **extra)


def _value_tests_in_child(overrides: dict, select: str):
    """Run this file's tests matching `select` in a child with the tuning overrides set (they are read once per
    process); all must pass."""
    env = {**os.environ, **overrides}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select]
    child = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-4000:] + child.stderr[-2000:]


@pytest.mark.parametrize("warps, wr", [(5, 5), (6, 3), (7, 1)])
def test_forced_cta_shapes(warps, wr):
    # The kernel's CTA shape (4-8 warps, some along rows and the rest splitting K) is chosen per shape; the
    # tuning overrides force one, read once per process: the value tests in a child with each forced.
    overrides = {"TORCHLOWBIT_GEMM4BIT_WARPS": str(warps), "TORCHLOWBIT_GEMM4BIT_WR": str(wr)}
    _value_tests_in_child(overrides, "more_row_tiles or (matches_float64 and bfloat16 and nf4)")


def test_reordered_activations():
    # Large weights have the fused kernel read its activations reordered by a first kernel; forced for every weight
    # (threshold 0 MiB), the value tests run in a child.
    select = "matches_float64 or more_row_tiles or blocksizes or nested_blocksizes or bias_dtypes or noncontiguous or "
    select += "large_and_split or path_switch or graph_capture"
    _value_tests_in_child({"TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB": "0"}, select)


def test_two_m_tiles_forced():
    # m <= 4 takes two m-tiles a warp on large weights; forced for every weight (threshold 0 MiB), the value tests
    # run in a child.
    select = "matches_float64 or more_row_tiles or blocksizes or bias_dtypes or noncontiguous or large_and_split"
    _value_tests_in_child({"TORCHLOWBIT_GEMM4BIT_TWO_TILES_MIN_MB": "0"}, select)


def _memory_gbps_per_sm() -> float:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8 / 1e9 / p.multi_processor_count


@pytest.mark.parametrize(
    "shape, reordered, two_if_fast",
    [
        ((4096, 4096), False, False),
        ((8192, 8192), False, True),
        ((11008, 4096), False, False),
        ((8192, 16384), True, True),
    ],
)
def test_kernel_choice_by_weight_size(shape, reordered, two_if_fast):
    # Packed weights of 64 MiB and more have the fused kernel read its activations reordered by a first kernel and,
    # at m = 1, take two m-tiles a warp. From 16 MiB it takes two m-tiles where the memory is fast for its SMs (the
    # H200's 36 GB/s an SM, not the H100's 25) unless their taller tiles leave an SM more rows: 11008 rows make 3
    # waves of the short tiles on 132 SMs, 2 of the tall ones. (The values of both paths are checked against float64
    # by the tests run with the thresholds forced to 0.)
    if not reordered and torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count != 132:
        pytest.skip("the expected choices are those of a 132-SM GPU (H100, H200)")
    g = torch.Generator(device="cuda").manual_seed(5)
    packed = torch.randint(0, 256, (shape[0] * shape[1] // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(shape[0] * shape[1] // 64, device="cuda", generator=g) + 0.5
    A = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = torch.ops.lowbit.gemm_4bit(A, packed, absmax, 64, "nf4", shape)
        torch.cuda.synchronize()
    assert out.shape == (1, shape[0]) and torch.isfinite(out).all()
    names = sorted({e.name for e in prof.events()})
    m_tiles = [int(x) for n in names for x in re.findall(r"gemv_4bit_kernel<c10::BFloat16, 1, (\d+),", n)]
    two = reordered or (two_if_fast and _memory_gbps_per_sm() >= 30)
    assert m_tiles == [2 if two else 1], names
    assert any("fragment_order_kernel" in n for n in names) == reordered, names


_BAD_OVERRIDES = [  # (environment, rows of A that reach the override, the error's pattern)
    ({"TORCHLOWBIT_GEMM4BIT_WARPS": "8", "TORCHLOWBIT_GEMM4BIT_WR": "3"}, 1, r"GEMM4BIT_WR \(3\) must divide"),
    ({"TORCHLOWBIT_GEMM4BIT_WARPS": "9"}, 1, r"GEMM4BIT_WARPS must be an integer in \[4, 8\]"),
    ({"TORCHLOWBIT_GEMM4BIT_WR": "two"}, 1, r"GEMM4BIT_WR must be an integer in \[1, 8\].*got 'two'"),
    ({"TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M": "1e3"}, 1, r"GEMM4BIT_FUSED_MAX_M must be an integer"),
    ({"TORCHLOWBIT_GEMM4BIT_WGMMA_WG": "3", "TORCHLOWBIT_GEMM4BIT_WGMMA_MIN_TILES": "1"}, 64, r"must be 2 or 4"),
    ({"TORCHLOWBIT_GEMM4BIT_WS_MAX_M": "x"}, 200, r"GEMM4BIT_WS_MAX_M must be an integer"),
    ({"TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB": "-1"}, 1, r"GEMM4BIT_REORDER_MIN_MB must be an integer in \[0, "),
    ({"TORCHLOWBIT_GEMM4BIT_TWO_TILES_MIN_MB": "-2"}, 1, r"GEMM4BIT_TWO_TILES_MIN_MB must be an integer in \[0, "),
]


@pytest.mark.parametrize("env, m, message", _BAD_OVERRIDES)
def test_bad_tuning_overrides_raise(env, m, message):
    # A tuning override that cannot be honoured is a ValueError naming it, not silently replaced by the default.
    hopper_only = ("TORCHLOWBIT_GEMM4BIT_WGMMA_WG", "TORCHLOWBIT_GEMM4BIT_WS_MAX_M")
    if any(name in env for name in hopper_only) and not _wgmma_device():
        pytest.skip("the wgmma kernels' overrides are read on Hopper only")
    script = f"""
import re, torch, torchlowbit
W = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
packed, absmax = torch.ops.lowbit.quantize_4bit(W, 64, "nf4", torch.uint8)
A = torch.randn({m}, 256, device="cuda", dtype=torch.bfloat16)
try:
    torch.ops.lowbit.gemm_4bit(A, packed, absmax, 64, "nf4", W.shape)
except ValueError as error:
    assert re.search({message!r}, str(error)), str(error)
    print("raised")
"""
    child = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert child.returncode == 0 and child.stdout.strip() == "raised", child.stdout[-2000:] + child.stderr[-2000:]


def _wgmma_device():
    return torch.cuda.get_device_capability() == (9, 0)


_FORCED_KERNELS = {
    # the wgmma kernel for every m, both CTA sizes
    "wgmma-2": {"TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M": "100000", "TORCHLOWBIT_GEMM4BIT_WGMMA_WG": "2"},
    "wgmma-4": {"TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M": "100000", "TORCHLOWBIT_GEMM4BIT_WGMMA_WG": "4"},
    # the warp-specialized kernel for every m
    "ws": {"TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M": "0", "TORCHLOWBIT_GEMM4BIT_WS_MAX_M": "100000"},
}


@pytest.mark.parametrize("kernel", sorted(_FORCED_KERNELS))
def test_forced_wgmma_kernels(kernel):
    # The Hopper kernels run by default only where they are the fastest path; forced for every shape they take
    # (K % 64 == 0, blocksize >= 64) and every m (the fused kernel of few rows off), the value tests run in a child.
    overrides = {
        "TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M": "0",
        "TORCHLOWBIT_GEMM4BIT_WGMMA_MIN_TILES": "1",
        **_FORCED_KERNELS[kernel],
    }
    select = "matches_float64 or bias_dtypes or blocksizes or nested_blocksizes or path_switch or graph_capture"
    _value_tests_in_child(overrides, select)


@pytest.mark.skipif(not torch.cuda.is_available() or not _wgmma_device(), reason="the wgmma kernel is for Hopper")
@pytest.mark.parametrize("m, kernel", [(64, "gemm_4bit_wgmma_kernel"), (200, "gemm_4bit_ws_kernel")])
def test_wgmma_kernels_run_on_large_layers(m, kernel):
    # 256 weight rows an SM: the default rules (m <= 128, then m <= 256, and waves that keep 80% of the SMs busy)
    # pick the wgmma kernels
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shape = (256 * sms, 128)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=4)
    A = _activations((m, shape[1]), torch.bfloat16, seed=4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _check(A, packed, absmax, 64, "nf4", shape, **extra)
    names = [e.name for e in prof.events()]
    assert any(kernel in n for n in names), sorted(set(names))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 4096])
@pytest.mark.parametrize("quant_storage", STORAGES)
def test_blocksizes_and_storages(blocksize, quant_storage):
    # in % blocksize != 0 puts block boundaries inside rows at different places in each row; blocksize > in
    # spreads one block over several rows.
    shapes = [(64, 4096), (70, 96), (50, 4160), (9, 2080), (300, 64)]
    for i, shape in enumerate(shapes):
        for nested in (False, True):
            packed, absmax, extra = _weight(shape, blocksize, quant_storage, nested, seed=blocksize + i)
            for m in (1, 9, 20, 70):
                A = _activations((m, shape[1]), torch.bfloat16, seed=m + i)
                _check(A, packed, absmax, blocksize, "nf4", shape, **extra)


@pytest.mark.parametrize("nested_blocksize", [32, 256, 4096])
def test_nested_blocksizes(nested_blocksize):
    shape = (96, 2048)
    packed, qabsmax, extra = _weight(shape, 64, torch.uint8, True, seed=nested_blocksize, nested_blocksize=256)
    extra["nested_absmax"] = torch.rand(-(-qabsmax.numel() // nested_blocksize)) + 0.5
    extra["nested_blocksize"] = nested_blocksize
    for m in (1, 5, 24, 40):
        A = _activations((m, shape[1]), torch.float16, seed=m)
        _check(A, packed, qabsmax, 64, "fp4", shape, **extra)


@pytest.mark.parametrize("bias_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dtypes(dtype, bias_dtype):
    shape = (130, 512)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=3)
    bias = (torch.randn(shape[0]) * 4).to(bias_dtype)
    for m in (1, 8, 17, 300):
        A = _activations((m, shape[1]), dtype, seed=m)
        _check(A, packed, absmax, 64, "nf4", shape, bias=bias, **extra)


def test_3d_noncontiguous_and_misaligned_A():
    shape = (96, 256)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=5)
    base = _activations((4, 3, 2 * shape[1] + 1), torch.bfloat16, seed=9).cuda()  # views taken on the device
    views = [
        base[..., : shape[1]],  # rows not contiguous
        base[..., 1 : shape[1] + 1],  # misaligned start
        base[..., : 2 * shape[1] : 2],  # strided last dim
        base[:, 0, : shape[1]],  # 2-d view
        base[0, 0, : shape[1]],  # 1-d A: output (out,)
        base.transpose(0, 1)[..., : shape[1]],
        base[:, :, : shape[1]].transpose(0, 1).contiguous().transpose(0, 1),  # permuted strides
    ]
    for A in views:
        _check(A, packed, absmax, 64, "nf4", shape, **extra)
        if A.dim() > 1:
            _check(A[:2], packed, absmax, 64, "nf4", shape, **extra)


def test_large_and_split_shapes():
    # many row groups with a partial last one; several iterations per warp; a table too large for shared memory
    # (in = 65536 with blocksize 32) takes the dequantize path.
    for shape, blocksize in (((4100, 1024), 64), ((33, 65536), 32), ((1000, 8192), 4096)):
        packed, absmax, extra = _weight(shape, blocksize, torch.uint8, True, seed=shape[0])
        for m in (1, 3, 32):
            A = _activations((m, shape[1]), torch.float16, seed=m)
            fused = False if shape[1] == 65536 else None  # the table of 65536 / 32 blocks a row is too large
            _check(A, packed, absmax, blocksize, "nf4", shape, fused=fused, **extra)


def test_rows_around_the_path_switch():
    # the fused kernel (up to 32 rows by default, in launches of 32 rows when raised) and the dequantize path
    shape = (256, 512)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, False, seed=11)
    for m in (31, 32, 33, 40, 64, 65, 129):
        A = _activations((m, shape[1]), torch.bfloat16, seed=m)
        _check(A, packed, absmax, 64, "nf4", shape, **extra)


def test_empty_inputs():
    shape = (48, 64)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=1)
    args = (packed.cuda(), absmax.cuda(), 64, "nf4", list(shape))
    out = torch.ops.lowbit.gemm_4bit(torch.randn(0, 64, device="cuda", dtype=torch.bfloat16), *args, **_cuda(extra))
    assert out.shape == (0, 48)
    out = torch.ops.lowbit.gemm_4bit(torch.randn(2, 0, 64, device="cuda"), *args, **_cuda(extra))
    assert out.shape == (2, 0, 48)
    # out_features = 0
    packed0, absmax0, _ = _weight((0, 64), 64, torch.uint8, False, seed=1)
    out = torch.ops.lowbit.gemm_4bit(
        torch.randn(3, 64, device="cuda", dtype=torch.float16), packed0.cuda(), absmax0.cuda(), 64, "nf4", [0, 64]
    )
    assert out.shape == (3, 0) and out.dtype == torch.float16
    # in_features = 0: the bias alone
    packed0, absmax0, _ = _weight((5, 0), 64, torch.uint8, False, seed=1)
    bias = torch.randn(5, device="cuda")
    out = torch.ops.lowbit.gemm_4bit(
        torch.randn(3, 0, device="cuda", dtype=torch.bfloat16), packed0.cuda(), absmax0.cuda(), 64, "nf4", [5, 0],
        bias,
    )  # fmt: skip
    assert out.shape == (3, 5) and torch.equal(out, bias.to(torch.bfloat16).expand(3, 5))


def test_matches_cpu_reference_op():
    """The op on CUDA and on the CPU (reference kernel) agree to the rounding of A's dtype."""
    shape = (512, 1024)
    W = torch.randn(shape, dtype=torch.bfloat16)
    packed, absmax = torch.ops.lowbit.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = codebooks.create_dynamic_map()
    offset = absmax.mean().reshape(1)
    qabsmax, nested_absmax = torch.ops.lowbit.quantize_blockwise(absmax - offset, code, 256)
    bias = torch.randn(shape[0], dtype=torch.bfloat16)
    for m in (1, 16, 100):
        A = torch.randn(m, shape[1], dtype=torch.bfloat16)
        args = (packed, qabsmax, 64, "nf4", list(shape), bias, nested_absmax, code, offset, 256)
        expected = torch.ops.lowbit.gemm_4bit(A, *args).float()
        actual = torch.ops.lowbit.gemm_4bit(A.cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        rel = (actual.cpu().float() - expected).norm() / expected.norm()
        assert rel < 4e-3, (m, rel)


# ------------------------------------------------------------------------------------------------------
# autograd, opcheck, errors, graphs


def test_autograd_on_cuda():
    shape = (64, 128)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=2)
    packed, absmax, extra = packed.cuda(), absmax.cuda(), _cuda(extra)
    A = torch.randn(3, shape[1], device="cuda", requires_grad=True)
    bias = torch.randn(shape[0], device="cuda", requires_grad=True)
    out = torch.ops.lowbit.gemm_4bit(A, packed, absmax, 64, "nf4", list(shape), bias, **extra)
    grad = torch.randn_like(out)
    out.backward(grad)
    W = torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", list(shape), torch.float32, **extra)
    torch.testing.assert_close(A.grad, grad @ W)
    torch.testing.assert_close(bias.grad, grad.sum(0))


def _opcheck_cases():
    code = codebooks.create_dynamic_map().cuda()
    W = torch.randn(48, 128, device="cuda", dtype=torch.bfloat16)
    packed, absmax = torch.ops.lowbit.quantize_4bit(W, 64, "nf4", torch.uint8)
    offset = absmax.mean().reshape(1)
    qabsmax, nested_absmax = torch.ops.lowbit.quantize_blockwise(absmax - offset, code, 256)
    W70 = torch.randn(40, 70, device="cuda")
    packed70, absmax70 = torch.ops.lowbit.quantize_4bit(W70, 32, "fp4", torch.uint8)
    A = torch.randn(3, 5, 128, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(48, device="cuda")
    return [
        (A, packed, absmax, 64, "nf4", [48, 128]),
        (A[0].half(), packed, qabsmax, 64, "nf4", [48, 128], bias, nested_absmax, code, offset, 256),
        (A.float(), packed, qabsmax, 64, "nf4", [48, 128], bias.half(), nested_absmax, code, offset, 256),
        (torch.randn(70, 128, device="cuda", dtype=torch.bfloat16), packed, absmax, 64, "nf4", [48, 128], bias),
        (torch.randn(2, 70, device="cuda", dtype=torch.float16), packed70, absmax70, 32, "fp4", [40, 70]),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_cuda(case):
    torch.library.opcheck(torch.ops.lowbit.gemm_4bit.default, _opcheck_cases()[case])


def test_argument_errors_on_cuda():
    shape = [48, 64]
    packed, absmax, extra = _weight(tuple(shape), 64, torch.uint8, True, seed=1)
    packed, absmax, extra = packed.cuda(), absmax.cuda(), _cuda(extra)
    A = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.lowbit.gemm_4bit
    with pytest.raises(TypeError, match="A must have dtype"):
        op(A.int(), packed, absmax, 64, "nf4", shape, **extra)
    with pytest.raises(TypeError, match="B must have dtype"):
        op(A, packed.int(), absmax, 64, "nf4", shape, **extra)
    with pytest.raises(ValueError, match="blocksize"):
        op(A, packed, absmax, 48, "nf4", shape, **extra)
    with pytest.raises(ValueError, match="quant_type"):
        op(A, packed, absmax, 64, "nf5", shape, **extra)
    with pytest.raises(ValueError, match="bytes"):
        op(A, packed, absmax, 64, "nf4", [48, 66], **extra)
    with pytest.raises(ValueError, match="absmax"):
        op(A, packed, absmax[:-1], 64, "nf4", shape, **extra)
    with pytest.raises(TypeError, match="absmax"):
        op(A, packed, absmax.float(), 64, "nf4", shape, **extra)
    with pytest.raises(ValueError, match="nested"):
        op(A, packed, absmax, 64, "nf4", shape, nested_absmax=extra["nested_absmax"])
    with pytest.raises(ValueError, match="nested_offset"):
        op(A, packed, absmax, 64, "nf4", shape, **{**extra, "nested_offset": torch.zeros(2, device="cuda")})
    with pytest.raises(ValueError, match="2-d"):
        op(A, packed, absmax, 64, "nf4", [48, 8, 8], **extra)
    with pytest.raises(ValueError, match="A must have shape"):
        op(A[:, :32], packed, absmax, 64, "nf4", shape, **extra)
    with pytest.raises(ValueError, match="bias must have shape"):
        op(A, packed, absmax, 64, "nf4", shape, torch.zeros(47, device="cuda"), **extra)
    with pytest.raises(TypeError, match="bias"):
        op(A, packed, absmax, 64, "nf4", shape, torch.zeros(48, device="cuda", dtype=torch.int32), **extra)
    with pytest.raises(ValueError, match="device"):
        op(A, packed, absmax.cpu(), 64, "nf4", shape, **extra)
    with pytest.raises(ValueError, match="device"):
        op(A, packed, absmax, 64, "nf4", shape, torch.zeros(48), **extra)


@pytest.mark.parametrize("m", [1, 20, 300])
def test_cuda_graph_capture(m):
    shape = (256, 1024)
    packed, absmax, extra = _weight(shape, 64, torch.uint8, True, seed=m)
    packed, absmax, extra = packed.cuda(), absmax.cuda(), _cuda(extra)
    bias = torch.randn(shape[0], device="cuda", dtype=torch.bfloat16)
    A = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)

    def run():
        return torch.ops.lowbit.gemm_4bit(A, packed, absmax, 64, "nf4", list(shape), bias, **extra)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    A.copy_(torch.randn_like(A))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run(), rtol=0, atol=0) if m <= 32 else torch.testing.assert_close(out, run())
