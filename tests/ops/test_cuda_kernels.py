"""The CUDA kernels of csrc/ against the PyTorch reference kernels, run on the CPU on the same inputs.

Quantization and dequantization must agree bit for bit (packed bytes, codes, absmax, outputs); stochastic
8-bit rounding (a seed) must pick one of the two neighbouring code values, without bias.
"""

import math

import pytest
import torch

import torchlowbit  # noqa: F401  (registers torch.ops.lowbit.*)
from torchlowbit import codebooks
from torchlowbit.ops import CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_OPS = ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]
QUANT_TYPES = ["nf4", "fp4"]
BLOCKSIZES = [32, 64, 256, 4096]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _sizes(blocksize):
    """Element counts: empty, one, odd, partial last blocks, several tiles of the CUDA kernels."""
    return [0, 1, 2, 7, 31, blocksize - 1, blocksize + 1, 3 * blocksize + 5, 5000, 4096 * 2 + 13]


def _data(shape, dtype, seed):
    """Normal values at varied scales per block, with an all-zero stretch and exact +-0 and a 1.0."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g).cumsum(0) * 0.01)
    if n > 300:
        x[100:300] = 0.0
        x[301] = -0.0
        x[302] = 1.0
    return x.to(dtype).view(shape)


def _bits(t):
    """The raw bits of ``t`` (so NaN payloads and -0.0 compare exactly)."""
    t = t.contiguous()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _assert_bits_equal(actual, expected, inputs=None, per_output=1):
    """Bitwise equality; on failure, the first differences and (``inputs``) the input values that made them."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual, expected)
    a, e = _bits(actual.cpu()), _bits(expected.cpu())
    if not torch.equal(a, e):
        flat_a, flat_e = a.reshape(-1), e.reshape(-1)
        bad = (flat_a != flat_e).nonzero().view(-1)
        lines = [f"{bad.numel()} of {a.numel()} differ"]
        for i in bad[:6].tolist():
            line = f"  [{i}] actual {flat_a[i].item():#x} expected {flat_e[i].item():#x}"
            if inputs is not None:
                x = inputs.reshape(-1)[i * per_output : (i + 1) * per_output].float()
                line += f" inputs {x.tolist()} bits {[hex(b) for b in x.view(torch.int32).tolist()]}"
            lines.append(line)
        raise AssertionError("\n".join(lines))


def _midpoint_probe(code, dtype):
    """Blocks of 64 holding 1.0 (so absmax = 1 and values are not rescaled) and every midpoint between
    sorted code values, with its float32 neighbours: the halfway ties of bucketize."""
    values = code.sort().values
    mids = (values[1:] + values[:-1]) / 2
    probe = torch.cat(
        [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)), values, -mids]
    )
    probe = probe[probe.abs() <= 1]
    blocks = probe.split(63)
    x = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(63 - b.numel())]) for b in blocks])
    if dtype != torch.float32:  # keep only values the dtype holds exactly, so the probe stays a probe
        x = torch.where(x.to(dtype).float() == x, x, torch.zeros_like(x))
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit::{op}", "CUDA"), CUDA_EXTENSION_STATUS
    assert op not in CUDA_REFERENCE_OPS, f"lowbit::{op} runs the reference kernel on CUDA: {CUDA_EXTENSION_STATUS}"


# ------------------------------------------------------------------------------------------------------
# 4-bit


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_storage", STORAGES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_matches_reference(dtype, quant_type, quant_storage, blocksize):
    for i, n in enumerate(_sizes(blocksize)):
        A = _data((n,), dtype, seed=n + i)
        expected = torch.ops.lowbit.quantize_4bit(A, blocksize, quant_type, quant_storage)
        actual = torch.ops.lowbit.quantize_4bit(A.cuda(), blocksize, quant_type, quant_storage)
        _assert_bits_equal(actual[0], expected[0])
        _assert_bits_equal(actual[1], expected[1])


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_ties_and_special_values(dtype, quant_type):
    code = codebooks.get_4bit_code(quant_type)
    probe = _midpoint_probe(code[:8] if quant_type == "fp4" else code, dtype)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 1e-38, -1e-38] * 8).to(dtype)
    nan = torch.tensor([0.5, -0.25, float("nan"), 0.0] * 16).to(dtype)  # NaN block: absmax NaN, scale 0
    tiny = torch.tensor([1e-45, -1e-45, 0.0] * 32, dtype=torch.float32)  # subnormal absmax: 1/absmax = inf
    cases = [probe, -probe, special, nan, torch.randn(4096 * 3).to(dtype) * 1e4]
    if dtype == torch.float32:
        cases.append(tiny)
    for A in cases:
        for blocksize in (32, 64):
            expected = torch.ops.lowbit.quantize_4bit(A, blocksize, quant_type, torch.uint8)
            actual = torch.ops.lowbit.quantize_4bit(A.cuda(), blocksize, quant_type, torch.uint8)
            _assert_bits_equal(actual[0], expected[0], A, 2)
            _assert_bits_equal(actual[1], expected[1], A, blocksize)


def test_quantize_4bit_noncontiguous_misaligned_and_2d():
    base = _data((300, 257), torch.bfloat16, seed=3)
    for A in (base.t(), base[:, 1:], base.view(-1)[1:], base.view(-1)[3:]):
        for quant_type in QUANT_TYPES:
            expected = torch.ops.lowbit.quantize_4bit(A, 64, quant_type, torch.bfloat16)
            actual = torch.ops.lowbit.quantize_4bit(A.cuda(), 64, quant_type, torch.bfloat16)
            _assert_bits_equal(actual[0], expected[0])
            _assert_bits_equal(actual[1], expected[1])


def test_quantize_4bit_large():
    A = _data(((1 << 20) + 77,), torch.bfloat16, seed=5)
    for blocksize in BLOCKSIZES:
        expected = torch.ops.lowbit.quantize_4bit(A, blocksize, "nf4", torch.uint8)
        actual = torch.ops.lowbit.quantize_4bit(A.cuda(), blocksize, "nf4", torch.uint8)
        _assert_bits_equal(actual[0], expected[0])
        _assert_bits_equal(actual[1], expected[1])


def _packed_inputs(shape, blocksize, storage, nested, seed):
    """Random packed bytes (every nibble value) in ``storage``, with a float32 or double-quantized absmax."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    count = math.ceil(math.ceil(numel / 2) / storage.itemsize)
    packed = torch.randint(0, 256, (count * storage.itemsize,), dtype=torch.uint8, generator=g)
    packed = packed.view(storage).view(count, 1)
    nblocks = -(-numel // blocksize)
    absmax = torch.rand(nblocks, generator=g) * 3 + 0.01
    if not nested:
        return packed, absmax, {}
    code = codebooks.create_dynamic_map()
    qabsmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
    nested_absmax = torch.rand(-(-nblocks // 256), generator=g) + 0.5
    offset = torch.tensor([0.123456789123])  # float32, as every op takes it
    return packed, qabsmax, dict(nested_absmax=nested_absmax, nested_code=code, nested_offset=offset)


def _to_cuda(kwargs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_storage", STORAGES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_matches_reference(dtype, quant_type, quant_storage, blocksize, nested):
    shapes = [(n,) for n in _sizes(blocksize)] + [(3, 0), (17, 33), (64, 4100)]
    for i, shape in enumerate(shapes):
        packed, absmax, extra = _packed_inputs(shape, blocksize, quant_storage, nested, seed=i)
        expected = torch.ops.lowbit.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, **extra)
        actual = torch.ops.lowbit.dequantize_4bit(
            packed.cuda(), absmax.cuda(), blocksize, quant_type, shape, dtype, **_to_cuda(extra)
        )
        _assert_bits_equal(actual, expected)


def test_dequantize_4bit_nested_blocksizes_and_misaligned_buffer():
    shape = (1000, 77)
    for nested_blocksize in (32, 256, 4096):
        packed, qabsmax, extra = _packed_inputs(shape, 64, torch.uint8, True, seed=nested_blocksize)
        extra["nested_absmax"] = torch.rand(-(-qabsmax.numel() // nested_blocksize)) + 0.5
        extra["nested_blocksize"] = nested_blocksize
        expected = torch.ops.lowbit.dequantize_4bit(packed, qabsmax, 64, "nf4", shape, torch.bfloat16, **extra)
        big = torch.cat([torch.zeros(1, 1, dtype=torch.uint8), packed]).cuda()
        actual = torch.ops.lowbit.dequantize_4bit(
            big[1:], qabsmax.cuda(), 64, "nf4", shape, torch.bfloat16, **_to_cuda(extra)
        )
        _assert_bits_equal(actual, expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_round_trip_on_cuda(quant_type):
    A = torch.randn(4096, 333, device="cuda", dtype=torch.bfloat16)
    packed, absmax = torch.ops.lowbit.quantize_4bit(A, 64, quant_type, torch.uint8)
    out = torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, quant_type, A.shape, torch.bfloat16)
    expected = torch.ops.lowbit.dequantize_4bit(packed.cpu(), absmax.cpu(), 64, quant_type, A.shape, torch.bfloat16)
    _assert_bits_equal(out, expected)
    err = (out.float() - A.float()).norm() / A.float().norm()
    assert err < (0.11 if quant_type == "nf4" else 0.13)


# ------------------------------------------------------------------------------------------------------
# 8-bit


def _codes_8bit():
    g = torch.Generator().manual_seed(7)
    dynamic = codebooks.create_dynamic_map(signed=True)
    return {
        "dynamic": dynamic,
        "dynamic_unsigned": codebooks.create_dynamic_map(signed=False),
        "shuffled": dynamic[torch.randperm(256, generator=g)],
        "random": torch.rand(256, generator=g) * 2 - 1,
    }


@pytest.mark.parametrize("code_name", ["dynamic", "dynamic_unsigned", "shuffled", "random"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_matches_reference(dtype, blocksize, code_name):
    code = _codes_8bit()[code_name]
    assert code.unique().numel() == 256  # distinct values: the nearest index is unique
    for i, n in enumerate(_sizes(blocksize)):
        A = _data((n,), dtype, seed=n + 3 * i)
        expected = torch.ops.lowbit.quantize_blockwise(A, code, blocksize)
        actual = torch.ops.lowbit.quantize_blockwise(A.cuda(), code.cuda(), blocksize)
        _assert_bits_equal(actual[0], expected[0])
        _assert_bits_equal(actual[1], expected[1])


@pytest.mark.parametrize("code_name", ["dynamic", "shuffled"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_ties_and_special_values(dtype, code_name):
    code = _codes_8bit()[code_name]
    probe = _midpoint_probe(code, dtype)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, float("nan"), 1.0] * 8).to(dtype)
    for A in (probe, -probe, special, _data((3, 1000), dtype, seed=1)):
        expected = torch.ops.lowbit.quantize_blockwise(A, code, 64)
        actual = torch.ops.lowbit.quantize_blockwise(A.cuda(), code.cuda(), 64)
        _assert_bits_equal(actual[0], expected[0], A, 1)
        _assert_bits_equal(actual[1], expected[1], A, 64)


def test_quantize_blockwise_code_with_duplicates():
    """Duplicate values: the index among equal values may differ from the CPU's unstable sort, the value not."""
    for code in (codebooks.create_linear_map(signed=True), codebooks.create_fp8_map()):
        A = _data((20000,), torch.float32, seed=11)
        q_cpu, absmax_cpu = torch.ops.lowbit.quantize_blockwise(A, code, 256)
        q_cuda, absmax_cuda = torch.ops.lowbit.quantize_blockwise(A.cuda(), code.cuda(), 256)
        _assert_bits_equal(absmax_cuda, absmax_cpu)
        assert torch.equal(code[q_cuda.cpu().long()], code[q_cpu.long()])  # -0.0 == 0.0 here


def test_quantize_blockwise_large_and_2d():
    A = _data((1029, 1031), torch.bfloat16, seed=2)
    code = codebooks.create_dynamic_map()
    for blocksize in BLOCKSIZES:
        expected = torch.ops.lowbit.quantize_blockwise(A, code, blocksize)
        actual = torch.ops.lowbit.quantize_blockwise(A.cuda(), code.cuda(), blocksize)
        _assert_bits_equal(actual[0], expected[0])
        _assert_bits_equal(actual[1], expected[1])
    for view in (A.t(), A[:, 1:], A.view(-1)[5:]):
        expected = torch.ops.lowbit.quantize_blockwise(view, code, 256)
        actual = torch.ops.lowbit.quantize_blockwise(view.cuda(), code.cuda(), 256)
        _assert_bits_equal(actual[0], expected[0])
        _assert_bits_equal(actual[1], expected[1])


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_blockwise_matches_reference(dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    code = codebooks.create_dynamic_map()
    for shape in [(n,) for n in _sizes(blocksize)] + [(0, 5), (33, 129), (4100, 7)]:
        numel = math.prod(shape)
        A = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        absmax = torch.rand(-(-numel // blocksize), generator=g) * 5
        expected = torch.ops.lowbit.dequantize_blockwise(A, absmax, code, blocksize, dtype)
        actual = torch.ops.lowbit.dequantize_blockwise(A.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
        _assert_bits_equal(actual, expected)
    A = torch.randint(0, 256, (5001,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-5000 // blocksize), generator=g)
    expected = torch.ops.lowbit.dequantize_blockwise(A[1:], absmax, code, blocksize, dtype)
    actual = torch.ops.lowbit.dequantize_blockwise(A.cuda()[1:], absmax.cuda(), code.cuda(), blocksize, dtype)
    _assert_bits_equal(actual, expected)


@pytest.mark.parametrize("code_name", ["dynamic", "shuffled"])
def test_quantize_blockwise_stochastic(code_name):
    code = _codes_8bit()[code_name].cuda()
    values = code.sort().values
    n = 1 << 20
    A = torch.rand(n, device="cuda") * 2 - 1
    A[::256] = 1.0  # absmax 1 in every block of 256: the scaled values are A itself
    q, absmax = torch.ops.lowbit.quantize_blockwise(A, code, 256, seed=1234)
    assert torch.equal(absmax, torch.ones_like(absmax))
    decoded = code[q.long()]
    upper = torch.bucketize(A, values).clamp(1, 255)
    low, high = values[upper - 1], values[upper]
    assert bool(((decoded == low) | (decoded == high)).all())
    error = (decoded - A).double()
    assert abs(error.mean().item()) < 5 * error.std().item() / math.sqrt(n) + 1e-7
    # probability of rounding up follows the position between the neighbours
    frac = ((A - low) / (high - low)).double()
    took_upper = (decoded == high) & (high != low)
    for lo_f, hi_f in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
        sel = (frac >= lo_f) & (frac < hi_f) & (high != low)
        rate = took_upper[sel].double().mean().item()
        assert abs(rate - (lo_f + hi_f) / 2) < 0.02, (lo_f, hi_f, rate)
    again, _ = torch.ops.lowbit.quantize_blockwise(A, code, 256, seed=1234)
    other, _ = torch.ops.lowbit.quantize_blockwise(A, code, 256, seed=4321)
    assert torch.equal(q, again) and not torch.equal(q, other)


# ------------------------------------------------------------------------------------------------------
# opcheck, errors, graphs


def _opcheck_cases():
    A = torch.randn(33, 70, device="cuda", dtype=torch.bfloat16)
    code = codebooks.create_dynamic_map().cuda()
    packed, absmax = torch.ops.lowbit.quantize_4bit(A, 64, "nf4", torch.uint8)
    qabsmax, nested_absmax = torch.ops.lowbit.quantize_blockwise(absmax - absmax.mean(), code, 256)
    offset = torch.tensor([0.25], device="cuda")
    packed_bf16, absmax_fp4 = torch.ops.lowbit.quantize_4bit(A, 32, "fp4", torch.bfloat16)
    q8, absmax8 = torch.ops.lowbit.quantize_blockwise(A, code, 128)
    return [
        ("quantize_4bit", (A[:, ::2], 64, "nf4", torch.uint8)),
        ("quantize_4bit", (A.float(), 32, "fp4", torch.bfloat16)),
        ("dequantize_4bit", (packed, absmax, 64, "nf4", [33, 70], torch.bfloat16)),
        ("dequantize_4bit", (packed, qabsmax, 64, "nf4", [33, 70], torch.float16, nested_absmax, code, offset, 256)),
        ("dequantize_4bit", (packed_bf16, absmax_fp4, 32, "fp4", [33, 70], torch.float32)),
        ("quantize_blockwise", (A, code, 128)),
        ("quantize_blockwise", (A.half(), code, 4096, 7)),
        ("dequantize_blockwise", (q8, absmax8, code, 128, torch.float32)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck_cuda(case):
    name, args = _opcheck_cases()[case]
    test_utils = list(torch.library.opcheck.__kwdefaults__["test_utils"])
    packed_as_float = any(isinstance(a, torch.dtype) and a.is_floating_point for a in args) and name == "quantize_4bit"
    if packed_as_float:  # packed bytes seen as bf16 can be NaN patterns, which float comparison rejects
        test_utils.remove("test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.lowbit, name).default, args, test_utils=test_utils)


def test_argument_errors_on_cuda():
    A = torch.randn(128, device="cuda")
    code = codebooks.create_dynamic_map().cuda()
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.lowbit.quantize_4bit(A, 48, "nf4", torch.uint8)
    with pytest.raises(ValueError, match="quant_type"):
        torch.ops.lowbit.quantize_4bit(A, 64, "nf5", torch.uint8)
    with pytest.raises(TypeError, match="quant_storage"):
        torch.ops.lowbit.quantize_4bit(A, 64, "nf4", torch.int32)
    with pytest.raises(TypeError, match="A"):
        torch.ops.lowbit.quantize_4bit(A.int(), 64, "nf4", torch.uint8)
    packed, absmax = torch.ops.lowbit.quantize_4bit(A, 64, "nf4", torch.uint8)
    with pytest.raises(ValueError, match="absmax"):
        torch.ops.lowbit.dequantize_4bit(packed, absmax[:1], 64, "nf4", [128], torch.float16)
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", [130], torch.float16)
    with pytest.raises(ValueError, match="nested"):
        torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", [128], torch.float16, nested_absmax=absmax)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", [128], torch.int8)
    with pytest.raises(ValueError, match="device"):
        torch.ops.lowbit.dequantize_4bit(packed, absmax.cpu(), 64, "nf4", [128], torch.float16)
    with pytest.raises(ValueError, match="code"):
        torch.ops.lowbit.quantize_blockwise(A, code[:255], 64)
    with pytest.raises(TypeError, match="code"):
        torch.ops.lowbit.quantize_blockwise(A, code.double(), 64)
    with pytest.raises(ValueError, match="device"):
        torch.ops.lowbit.quantize_blockwise(A, code.cpu(), 64)
    q, absmax8 = torch.ops.lowbit.quantize_blockwise(A, code, 64)
    with pytest.raises(TypeError, match="A"):
        torch.ops.lowbit.dequantize_blockwise(q.int(), absmax8, code, 64, torch.float32)
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.lowbit.dequantize_blockwise(q, absmax8, code, 16, torch.float32)


def test_cuda_graph_capture():
    A = torch.randn(1000, 301, device="cuda", dtype=torch.bfloat16)
    code = codebooks.create_dynamic_map().cuda()
    offset = torch.zeros(1, device="cuda")

    def run():
        packed, absmax = torch.ops.lowbit.quantize_4bit(A, 64, "nf4", torch.uint8)
        qabsmax, nested_absmax = torch.ops.lowbit.quantize_blockwise(absmax, code, 256)
        out4 = torch.ops.lowbit.dequantize_4bit(
            packed, qabsmax, 64, "nf4", A.shape, torch.bfloat16, nested_absmax, code, offset, 256
        )
        q8, absmax8 = torch.ops.lowbit.quantize_blockwise(A, code, 4096, seed=3)
        out8 = torch.ops.lowbit.dequantize_blockwise(q8, absmax8, code, 4096, torch.float16)
        return packed, out4, out8

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    A.copy_(torch.randn_like(A))
    graph.replay()
    torch.cuda.synchronize()
    fresh = run()
    for c, f, e in zip(captured, fresh, eager, strict=True):
        _assert_bits_equal(c, f)
        assert not torch.equal(_bits(c), _bits(e))
