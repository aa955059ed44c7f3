"""``torchlowbit.functional`` (the bitsandbytes functional API) against the format facts of DESIGN.md."""

import json
import math

import pytest
import torch
from helpers import CODES, FLOAT_DTYPES, FP4, NF4, randn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchlowbit as bnb
from torchlowbit import functional as F
from torchlowbit.functional import QuantState

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _randint8(shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).to(device)


def _eps(dtype):
    return torch.finfo(dtype).eps


# --------------------------------------------------------------------------------------------------------
# QuantState: the Linear4bit state_dict format (out=200, in=300, nf4, blocksize 64)
# --------------------------------------------------------------------------------------------------------

OUT_FEATURES, IN_FEATURES = 200, 300
BLOCKS = math.ceil(OUT_FEATURES * IN_FEATURES / 64)  # 938


def _linear4bit_weight(compress_statistics, dtype=torch.float16, quant_storage=torch.uint8, quant_type="nf4"):
    W = randn((OUT_FEATURES, IN_FEATURES), dtype, seed=1, scale=0.05)
    packed, state = F.quantize_4bit(
        W, blocksize=64, compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage
    )
    return W, packed, state


def _decode_json(t: torch.Tensor) -> dict:
    assert t.dtype == torch.uint8 and t.dim() == 1
    return json.loads(bytes(t.tolist()).decode("utf-8"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_as_dict_packed_plain(dtype):
    W, packed, state = _linear4bit_weight(False, dtype)
    assert packed.shape == (30000, 1) and packed.dtype == torch.uint8
    d = state.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
    assert d["absmax"].dtype == torch.float32 and d["absmax"].shape == (BLOCKS,)
    assert d["quant_map"].dtype == torch.float32 and d["quant_map"].shape == (16,)
    assert d["quant_map"].tolist() == torch.tensor(NF4, dtype=torch.float32).tolist()
    meta = _decode_json(d["quant_state.bitsandbytes__nf4"])
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": str(dtype).removeprefix("torch."),
                    "shape": [OUT_FEATURES, IN_FEATURES]}  # fmt: skip
    # every value in the packed dict is a tensor (safetensors can store it)
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    # the absmax is the per-block absmax of the flattened weight
    expected = torch.nn.functional.pad(W.float().view(-1), (0, BLOCKS * 64 - W.numel())).view(-1, 64).abs().amax(1)
    assert torch.equal(d["absmax"], expected)


def test_as_dict_packed_nested():
    W, packed, state = _linear4bit_weight(True)
    assert packed.shape == (30000, 1) and packed.dtype == torch.uint8
    d = state.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"}
    assert d["absmax"].dtype == torch.uint8 and d["absmax"].shape == (BLOCKS,)
    assert d["quant_map"].dtype == torch.float32 and d["quant_map"].shape == (16,)
    assert d["nested_absmax"].dtype == torch.float32 and d["nested_absmax"].shape == (4,)
    assert d["nested_quant_map"].dtype == torch.float32 and d["nested_quant_map"].shape == (256,)
    assert torch.equal(d["nested_quant_map"], F.create_dynamic_map(signed=True))
    meta = _decode_json(d["quant_state.bitsandbytes__nf4"])
    assert set(meta) == {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                         "nested_offset"}  # fmt: skip
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "float16"
    assert meta["shape"] == [OUT_FEATURES, IN_FEATURES]
    assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    # offset = mean of the float absmax; the uint8 codes + second-level absmax decode back to the absmax
    true_absmax = torch.nn.functional.pad(W.float().view(-1), (0, BLOCKS * 64 - W.numel())).view(-1, 64).abs().amax(1)
    assert isinstance(meta["nested_offset"], float)
    assert meta["nested_offset"] == pytest.approx(true_absmax.mean().item(), rel=1e-6)
    code = d["nested_quant_map"]
    decoded = code[d["absmax"].long()] * d["nested_absmax"].repeat_interleave(256)[:BLOCKS] + meta["nested_offset"]
    spread = (true_absmax - meta["nested_offset"]).abs().max().item()
    assert (decoded - true_absmax).abs().max().item() <= spread * 0.01


@pytest.mark.parametrize(
    "quant_storage, shape", [(torch.uint8, (30000, 1)), (torch.bfloat16, (15000, 1)), (torch.float32, (7500, 1))]
)
def test_quant_storage_shapes(quant_storage, shape):
    _, packed_u8, _ = _linear4bit_weight(False)
    _, packed, state = _linear4bit_weight(False, quant_storage=quant_storage)
    assert packed.shape == shape and packed.dtype == quant_storage
    # the same bytes, reinterpreted
    assert torch.equal(packed.view(-1).view(torch.uint8), packed_u8.view(-1))
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(packed_u8, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_from_dict_round_trip_with_prefix(nested, quant_type):
    _, packed, state = _linear4bit_weight(nested, quant_type=quant_type)
    sd = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    sd["weight"] = packed  # a module state_dict also holds the weight itself ...
    qs = {k: v for k, v in sd.items() if k != "weight"}  # ... which the caller leaves out
    restored = QuantState.from_dict(qs, device="cpu")
    assert restored == state
    assert restored.nested == nested and restored.quant_type == quant_type and restored.blocksize == 64
    assert restored.shape == torch.Size([OUT_FEATURES, IN_FEATURES]) and restored.dtype == torch.float16
    if nested:
        assert restored.offset.item() == pytest.approx(state.offset.item(), rel=1e-6)
        assert restored.state2.blocksize == 256
    assert torch.equal(F.dequantize_4bit(packed, restored), F.dequantize_4bit(packed, state))
    # the unpacked dict round-trips too
    assert QuantState.from_dict(state.as_dict(), device="cpu") == state
    # the input dict is not consumed
    assert any("quant_state" in k for k in qs)


def test_from_dict_errors():
    _, _, state = _linear4bit_weight(False)
    d = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="neither"):
        QuantState.from_dict({"absmax": d["absmax"]}, device="cpu")
    two = dict(d)
    two["quant_state.bitsandbytes__fp4"] = d["quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="exactly one"):
        QuantState.from_dict(two, device="cpu")
    bad_suffix = {k.replace("__nf4", "__int4"): v for k, v in d.items()}
    with pytest.raises(ValueError, match="exactly one"):
        QuantState.from_dict(bad_suffix, device="cpu")
    unknown = dict(d)
    unknown["weight.SCB"] = torch.ones(3)
    with pytest.raises(ValueError, match="SCB"):
        QuantState.from_dict(unknown, device="cpu")
    meta = _decode_json(d["quant_state.bitsandbytes__nf4"])
    meta["quant_type"] = "int4"
    bad_type = dict(d)
    bad_type["quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type"):
        QuantState.from_dict(bad_type, device="cpu")


@pytest.mark.parametrize("nested", [False, True])
def test_quant_state_to(device, nested):
    _, _, state = _linear4bit_weight(nested)
    reference = QuantState.from_dict(state.as_dict(), device="cpu")
    moved = state.to(device)
    assert moved is state  # in place, like the original library (which returns None)
    tensors = [moved.absmax, moved.code] + ([moved.state2.absmax, moved.state2.code, moved.offset] if nested else [])
    assert all(t.device.type == device for t in tensors)
    back = moved.to("cpu")
    assert back.absmax.device.type == "cpu" and back == reference


def test_quant_state_equality():
    _, _, a = _linear4bit_weight(False)
    _, _, b = _linear4bit_weight(False)
    assert a == b and not (a != b)
    _, _, nested = _linear4bit_weight(True)
    _, _, nested2 = _linear4bit_weight(True)
    assert nested == nested2
    assert a != "not a state" and a != None  # noqa: E711
    changed = QuantState.from_dict(a.as_dict(), device="cpu")
    changed.absmax = changed.absmax * 1.01
    assert changed != a
    changed = QuantState.from_dict(a.as_dict(), device="cpu")
    changed.blocksize = 128
    assert changed != a
    changed = QuantState.from_dict(a.as_dict(), device="cpu")
    changed.shape = torch.Size([300, 200])
    assert changed != a
    changed = QuantState.from_dict(a.as_dict(), device="cpu")
    changed.dtype = torch.bfloat16
    assert changed != a
    changed = QuantState.from_dict(nested.as_dict(), device="cpu")
    changed.offset = changed.offset + 0.5
    assert changed != nested
    _, _, fp4 = _linear4bit_weight(False, quant_type="fp4")
    assert fp4 != a


def test_quant_state_nested_and_plain_are_unequal():
    _, _, plain = _linear4bit_weight(False)
    _, _, nested = _linear4bit_weight(True)
    assert plain != nested and nested != plain


def test_as_dict_of_blockwise_state():
    _, state = F.quantize_blockwise(torch.randn(300), blocksize=64)
    d = state.as_dict()
    assert d["shape"] is None and d["quant_type"] is None and d["blocksize"] == 64
    assert state.as_dict(packed=True).keys() == d.keys()


# --------------------------------------------------------------------------------------------------------
# 4-bit bytes built independently from the format facts
# --------------------------------------------------------------------------------------------------------


def _expected_codes(values: list[float], blocksize: int, quant_type: str):
    """Per block: absmax = max |x|; code = nearest table entry to x / absmax (FP4: sign bit + nearest magnitude).

    Returns, per element, the set of acceptable codes (more than one only at a float rounding tie) and the
    absmax of every block.
    """
    table = CODES[quant_type]
    acceptable, absmaxes = [], []
    for start in range(0, len(values), blocksize):
        block = values[start : start + blocksize]
        absmax = max(abs(v) for v in block)
        absmaxes.append(absmax)
        for v in block:
            x = v / absmax if absmax else 0.0
            if quant_type == "nf4":
                candidates = list(range(16))
                distances = [abs(x - table[i]) for i in candidates]
            else:
                sign = 8 if x < 0 else 0
                candidates = [sign + i for i in range(8)]
                distances = [abs(abs(x) - table[i]) for i in range(8)]
            best = min(distances)
            acceptable.append({c for c, d in zip(candidates, distances, strict=True) if d - best <= 1e-6})
    return acceptable, absmaxes


def _nibbles(packed: torch.Tensor, numel: int) -> list[int]:
    raw = packed.contiguous().view(-1).view(torch.uint8).cpu().tolist()
    return [n for byte in raw for n in (byte >> 4, byte & 0xF)][:numel]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, blocksize", [((4, 40), 64), ((3, 7), 32), ((8, 64), 128)])
def test_quantize_4bit_bytes_from_format_facts(device, quant_type, shape, blocksize):
    W = randn(shape, torch.float32, device, seed=2)
    W.view(-1)[5] = 0.0
    packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
    values = W.cpu().view(-1).tolist()
    acceptable, absmaxes = _expected_codes(values, blocksize, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(W.numel() / 2), 1)
    assert state.absmax.cpu().tolist() == absmaxes
    codes = _nibbles(packed, W.numel())
    wrong = [i for i, (c, ok) in enumerate(zip(codes, acceptable, strict=True)) if c not in ok]
    assert not wrong, f"element {wrong[0]}: code {codes[wrong[0]]}, expected one of {acceptable[wrong[0]]}"
    # two codes per byte, first element in the high nibble
    raw = packed.view(-1).cpu().tolist()
    for i in range(W.numel() // 2):
        assert raw[i] == (codes[2 * i] << 4) | codes[2 * i + 1]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_odd_length_padding_nibble_matches_bitsandbytes(device, quant_type):
    W = randn((3, 7), torch.float32, device, seed=8)
    packed, _ = F.quantize_4bit(W, blocksize=32, quant_type=quant_type)
    zero_code = CODES[quant_type].index(0.0)
    assert packed.view(-1)[-1].item() & 0xF == zero_code


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_is_code_times_absmax(device, quant_type, dtype):
    W = randn((6, 50), dtype, device, seed=3)
    packed, state = F.quantize_4bit(W, blocksize=32, quant_type=quant_type)
    out = F.dequantize_4bit(packed, state)
    assert out.shape == W.shape and out.dtype == dtype
    codes = _nibbles(packed, W.numel())
    absmax = state.absmax.cpu().tolist()
    table = torch.tensor(CODES[quant_type], dtype=torch.float32)
    expected = torch.tensor([table[c].item() * absmax[i // 32] for i, c in enumerate(codes)], dtype=torch.float32)
    assert torch.equal(out.cpu().view(-1), expected.to(dtype))
    # the legacy signature: absmax and an out buffer giving shape and dtype
    buffer = torch.empty(W.shape, dtype=dtype, device=device)
    again = F.dequantize_4bit(packed, absmax=state.absmax, out=buffer, blocksize=32, quant_type=quant_type)
    assert again is buffer and torch.equal(again, out)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_nested_decodes_absmax(device, quant_type):
    W = randn((64, 80), torch.float32, device, seed=4)
    packed, state = F.quantize_4bit(W, blocksize=32, quant_type=quant_type, compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    _, plain = F.quantize_4bit(W, blocksize=32, quant_type=quant_type)
    code2 = state.state2.code.cpu()
    block_absmax = (
        code2[state.absmax.cpu().long()] * state.state2.absmax.cpu().repeat_interleave(256)[: state.absmax.numel()]
        + state.offset.item()
    )
    table = torch.tensor(CODES[quant_type])
    codes = torch.tensor(_nibbles(packed, W.numel()))
    expected = table[codes] * block_absmax.repeat_interleave(32)[: W.numel()]
    out = F.dequantize_4bit(packed, state)
    torch.testing.assert_close(out.cpu().view(-1), expected, rtol=1e-6, atol=1e-7)
    # the decoded absmax is close to the exact one
    assert (block_absmax - plain.absmax.cpu()).abs().max() <= 0.01 * plain.absmax.abs().max().item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_nf4_fp4_wrappers(device, quant_type):
    W = randn((16, 64), torch.bfloat16, device, seed=5)
    quantize = F.quantize_nf4 if quant_type == "nf4" else F.quantize_fp4
    dequantize = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
    packed, state = quantize(W, blocksize=64)
    ref_packed, ref_state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type)
    assert state.quant_type == quant_type and torch.equal(packed, ref_packed) and state == ref_state
    assert torch.equal(dequantize(packed, state), F.dequantize_4bit(packed, ref_state))
    # default blocksize is 64; the default quant_type of quantize_4bit is fp4
    _, default_state = F.quantize_4bit(W)
    assert default_state.blocksize == 64 and default_state.quant_type == "fp4"
    nested_packed, nested_state = quantize(W, compress_statistics=True)
    assert nested_state.nested and torch.equal(nested_packed, ref_packed)


def test_get_4bit_type(device):
    nf4 = F.get_4bit_type("nf4", device=device)
    fp4 = F.get_4bit_type("fp4", device=device)
    assert nf4.dtype == torch.float32 and nf4.device.type == device and nf4.shape == (16,)
    assert nf4.cpu().tolist() == torch.tensor(NF4, dtype=torch.float32).tolist()
    assert fp4.cpu().tolist() == torch.tensor(FP4, dtype=torch.float32).tolist()
    with pytest.raises(ValueError, match="quant_type"):
        F.get_4bit_type("int3")


# --------------------------------------------------------------------------------------------------------
# gemv_4bit
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("a_shape", [(1, 128), (1, 1, 128), (7, 128), (2, 3, 128)])
def test_gemv_4bit(device, a_shape, dtype, quant_type, nested):
    W = randn((48, 128), dtype, device, seed=6)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    A = randn(a_shape, dtype, device, seed=7)
    out = F.gemv_4bit(A, packed, state=state)
    assert out.shape == (*a_shape[:-1], 48) and out.dtype == dtype
    # the weight in float32 (code * absmax); kernels may round it to A's dtype before multiplying
    weight = F.dequantize_4bit(packed, _with_dtype(state, torch.float32)).double()
    assert torch.equal(weight.to(dtype), F.dequantize_4bit(packed, state))
    ref = A.double() @ weight.T
    magnitude = A.double().abs() @ weight.abs().T
    err = (out.double() - ref).abs()
    bound = _eps(dtype) * (ref.abs() + magnitude) + 16 * _eps(torch.float32) * magnitude + 1e-30
    assert (err <= bound).all()
    # the transposed packed view (how bnb's matmul_4bit hands it over) reads the same bytes
    assert torch.equal(F.gemv_4bit(A, packed.t(), state=state), out)
    buffer = torch.empty_like(out)
    assert F.gemv_4bit(A, packed, out=buffer, state=state) is buffer and torch.equal(buffer, out)


def _with_dtype(state: QuantState, dtype: torch.dtype) -> QuantState:
    copy = QuantState.from_dict(state.as_dict(), device=state.absmax.device)
    copy.dtype = dtype
    return copy


def test_gemv_4bit_needs_state():
    with pytest.raises(ValueError, match="state"):
        F.gemv_4bit(torch.randn(1, 64), torch.zeros(32, 1, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------------
# 8-bit blockwise
# --------------------------------------------------------------------------------------------------------


def _max_half_gap(code: torch.Tensor) -> float:
    values = code.double().sort().values
    return ((values[1:] - values[:-1]).max() / 2).item()


def test_quantize_blockwise_defaults(device):
    A = randn((3, 3000), torch.float32, device, seed=8)
    q, state = F.quantize_blockwise(A)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert state.blocksize == 4096 and state.absmax.shape == (math.ceil(9000 / 4096),)
    assert torch.equal(state.code.cpu(), F.create_dynamic_map(signed=True))
    assert not state.nested and state.dtype == torch.float32
    flat = A.cpu().view(-1)
    expected_absmax = torch.nn.functional.pad(flat, (0, 3 * 4096 - 9000)).view(3, 4096).abs().amax(1)
    assert torch.equal(state.absmax.cpu(), expected_absmax)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_round_trip(device, dtype, blocksize):
    A = randn((5000,), dtype, device, seed=9, scale=3.0)
    q, state = F.quantize_blockwise(A, blocksize=blocksize)
    out = F.dequantize_blockwise(q, state)
    assert out.dtype == dtype and out.shape == A.shape
    blocks = math.ceil(5000 / blocksize)
    absmax = state.absmax.cpu().repeat_interleave(blocksize)[:5000].double()
    bound = absmax * _max_half_gap(state.code.cpu()) * (1 + 1e-5) + _eps(dtype) * A.cpu().double().abs()
    assert ((out.cpu().double() - A.cpu().double()).abs() <= bound).all()
    assert state.absmax.shape == (blocks,)
    # each code is the nearest map entry to x / absmax
    code = state.code.cpu().double()
    x = (A.cpu().double() / absmax.clamp_min(1e-30))[:, None]
    distance = (x - code[None, :]).abs()
    chosen = distance.gather(1, q.cpu().long()[:, None]).squeeze(1)
    assert (chosen <= distance.min(1).values + 1e-6).all()


def test_blockwise_nested_round_trip(device):
    A = randn((40, 1000), torch.float32, device, seed=10)
    q, state = F.quantize_blockwise(A, blocksize=256, nested=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2 is not None
    _, plain = F.quantize_blockwise(A, blocksize=256)
    assert state.offset.item() == pytest.approx(plain.absmax.mean().item(), rel=1e-6)
    out = F.dequantize_blockwise(q, state)
    plain_out = F.dequantize_blockwise(q, plain)
    torch.testing.assert_close(out, plain_out, rtol=0.02, atol=0.02)
    assert (out - A).abs().max() < 0.05


def test_blockwise_out_buffers(device):
    A = randn((1000,), torch.float16, device, seed=11)
    q_ref, state_ref = F.quantize_blockwise(A, blocksize=128)
    out = torch.empty(1000, dtype=torch.uint8, device=device)
    absmax = torch.empty(8, dtype=torch.float32, device=device)
    q, state = F.quantize_blockwise(A, blocksize=128, out=out, absmax=absmax)
    assert q is out and torch.equal(q, q_ref)
    assert state.absmax is absmax and torch.equal(absmax, state_ref.absmax)
    deq = torch.empty(1000, dtype=torch.float16, device=device)
    result = F.dequantize_blockwise(q, state, out=deq)
    assert result is deq and torch.equal(deq, F.dequantize_blockwise(q_ref, state_ref))
    # from absmax (and default code) without a state: float32 output
    loose = F.dequantize_blockwise(q, absmax=state.absmax, blocksize=128)
    assert loose.dtype == torch.float32
    assert torch.equal(loose.half(), deq)
    # a custom code
    code = F.create_linear_map(signed=True).to(device)
    qc, sc = F.quantize_blockwise(A, code=code, blocksize=128)
    assert torch.equal(sc.code, code)
    from_code = F.dequantize_blockwise(qc, absmax=sc.absmax, code=code, blocksize=128)
    assert from_code.dtype == torch.float32
    assert torch.equal(from_code.half(), F.dequantize_blockwise(qc, sc))
    assert torch.equal(from_code.cpu(), code.cpu()[qc.cpu().long()] * sc.absmax.cpu().repeat_interleave(128)[:1000])


def test_blockwise_state_code_is_not_shared():
    A = torch.randn(512)
    _, first = F.quantize_blockwise(A, blocksize=256)
    _, second = F.quantize_blockwise(A, blocksize=256)
    assert first.code.data_ptr() != second.code.data_ptr()


# --------------------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
def test_igemm(device, shape):
    k, n = shape[-1], 24
    A = _randint8(shape, device, seed=12)
    B = _randint8((k, n), device, seed=13)
    ref = (A.cpu().long().reshape(-1, k) @ B.cpu().long()).view(*shape[:-1], n)
    out = F.igemm(A, B)
    assert out.dtype == torch.int32 and out.shape == (*shape[:-1], n)
    assert torch.equal(out.cpu().long(), ref)
    # transposed_B: B given as (n, k)
    assert torch.equal(F.igemm(A, B.t().contiguous(), transposed_B=True).cpu().long(), ref)
    if len(shape) == 2:
        # transposed_A: A given as (k, m)
        assert torch.equal(F.igemm(A.t().contiguous(), B, transposed_A=True).cpu().long(), ref)
    buffer = torch.empty(*shape[:-1], n, dtype=torch.int32, device=device)
    assert F.igemm(A, B, out=buffer) is buffer and torch.equal(buffer.cpu().long(), ref)


def test_igemm_seed_usage(device):
    # the seed's pattern: x8 (batch, seq, in) times the transposed int8 weight (out, in)
    x8 = _randint8((2, 5, 32), device, seed=14)
    weight8 = _randint8((16, 32), device, seed=15)
    out = F.igemm(x8, weight8.t())
    ref = torch.einsum("bsk,nk->bsn", x8.cpu().long(), weight8.cpu().long())
    assert out.shape == (2, 5, 16) and torch.equal(out.cpu().long(), ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(9, 70), (2, 4, 33)])
def test_int8_vectorwise_round_trip(device, dtype, shape):
    A = randn(shape, dtype, device, seed=16, scale=2.0)
    q, stats, outlier_cols = F.int8_vectorwise_quant(A)
    assert outlier_cols is None
    assert q.dtype == torch.int8 and q.shape == A.shape and stats.shape == (math.prod(shape[:-1]),)
    out = F.int8_vectorwise_dequant(q, stats)
    assert out.dtype == torch.float32 and out.shape == A.shape
    scale = stats.cpu().double().view(*shape[:-1], 1)
    err = (out.cpu().double() - A.cpu().double()).abs()
    assert (err <= scale / 127 / 2 * (1 + 1e-5)).all()


@settings(HYPOTHESIS)
@given(rows=st.integers(1, 8), cols=st.integers(1, 50), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-2, 1.0, 100.0]))  # fmt: skip
def test_int8_vectorwise_round_trip_property(device, rows, cols, seed, scale):
    A = randn((rows, cols), torch.float32, device, seed, scale)
    q, stats, _ = F.int8_vectorwise_quant(A)
    err = (F.int8_vectorwise_dequant(q, stats).cpu().double() - A.cpu().double()).abs()
    assert (err <= stats.cpu().double()[:, None] / 254 * (1 + 1e-5)).all()


def _bad_out_buffers(device):
    A = randn((64, 64), torch.float32, device, seed=12)
    q4, s4 = F.quantize_4bit(A, quant_type="nf4")
    i8 = torch.ones(4, 8, dtype=torch.int8, device=device)

    def empty(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=device)

    return [
        (lambda: F.quantize_blockwise(A, absmax=empty(1, dtype=torch.int64)), "absmax must have dtype torch.float32"),
        (lambda: F.quantize_blockwise(A, out=empty(64, 64, dtype=torch.int8)), "out must have dtype torch.uint8"),
        (lambda: F.quantize_4bit(A, out=empty(2048, 1, dtype=torch.float32)), "out must have dtype torch.uint8"),
        (lambda: F.quantize_4bit(A, absmax=empty(64, dtype=torch.bfloat16)), "absmax must have dtype torch.float32"),
        (lambda: F.dequantize_4bit(q4, s4, out=empty(64, 64, dtype=torch.int32)), "out must have dtype float16"),
        (
            lambda: F.int8_linear_matmul(i8, i8[:3], out=empty(4, 3, dtype=torch.int8)),
            "out must have dtype torch.int32",
        ),
        (lambda: F.int8_double_quant(A, row_stats=empty(64, dtype=torch.float16)), "row_stats must have dtype"),
    ]


def test_out_buffers_of_another_dtype_are_rejected(device):
    """A cast into the caller's buffer would silently change codes, scales or int32 sums."""
    for call, message in _bad_out_buffers(device):
        with pytest.raises(TypeError, match=message):
            call()


def test_states_of_the_wrong_kind_are_rejected(device):
    A = randn((64, 64), torch.float32, device, seed=14)
    q4, _ = F.quantize_4bit(A)
    q8, s8 = F.quantize_blockwise(A)
    for call, error, message in [
        (lambda: F.dequantize_4bit(q4, s8), ValueError, "quant_state must be the state of 4-bit codes"),
        (lambda: F.dequantize_4bit(q4, {"absmax": s8.absmax}), TypeError, "quant_state must be a QuantState, got dict"),
        (lambda: F.gemv_4bit(A, q4, state=s8), ValueError, "state must be the state of 4-bit codes"),
        (lambda: F.dequantize_blockwise(q8, (s8.absmax, s8.code)), TypeError, "must be a QuantState, got tuple"),
        (lambda: bnb.nn.Params4bit(q4, quant_state=s8), ValueError, "quant_state must be the state of 4-bit codes"),
        (lambda: bnb.nn.Params4bit(q4, quant_state=(s8.absmax,)), TypeError, "quant_state must be a QuantState"),
    ]:
        with pytest.raises(error, match=message):
            call()


def test_dequantize_4bit_writes_in_the_dtype_of_out(device):
    A = randn((64, 64), torch.float32, device, seed=13)
    q, state = F.quantize_4bit(A, quant_type="nf4")
    out = torch.empty(64, 64, dtype=torch.float16, device=device)
    assert F.dequantize_4bit(q, state, out=out) is out
    assert torch.equal(out, F.dequantize_4bit(q, state).half())


def test_int8_vectorwise_quant_outlier_columns(device):
    A = randn((6, 20), torch.float16, device, seed=17).clamp(-3, 3)
    q, _, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert cols is not None and cols.numel() == 0  # threshold > 0 without outliers: an empty index tensor
    A[2, 4] = 10
    A[5, 13] = -6
    q, _, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert cols.tolist() == [4, 13]
    assert (q[:, [4, 13]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_double_quant(device, dtype):
    A = randn((12, 40), dtype, device, seed=18, scale=2.0)
    out_row, out_col, row_stats, col_stats, cols = F.int8_double_quant(A)
    assert cols is None
    assert out_row.dtype == out_col.dtype == torch.int8 and out_row.shape == out_col.shape == A.shape
    A64 = A.cpu().double()
    assert torch.equal(row_stats.cpu().double(), A64.abs().amax(1))
    assert torch.equal(col_stats.cpu().double(), A64.abs().amax(0))
    exact_row = 127 * A64 / A64.abs().amax(1, keepdim=True)
    exact_col = 127 * A64 / A64.abs().amax(0, keepdim=True)
    assert ((out_row.cpu().double() - exact_row).abs() <= 0.5 + 1e-4).all()
    assert ((out_col.cpu().double() - exact_col).abs() <= 0.5 + 1e-4).all()
    assert torch.equal(out_row, F.int8_vectorwise_quant(A)[0])


def test_int8_double_quant_threshold_stats(device):
    A = randn((10, 16), torch.float16, device, seed=19).clamp(-3, 3)
    A[1, 2] = 8.0
    A[7, 9] = -12.0
    out_row, out_col, row_stats, col_stats, cols = F.int8_double_quant(A, threshold=6.0)
    assert cols.tolist() == [2, 9]
    mask = A.cpu().abs() >= 6
    inliers = A.cpu().double().masked_fill(mask, 0)
    # outliers are left out of both the row and the column statistics
    assert torch.equal(row_stats.cpu().double(), inliers.abs().amax(1))
    assert torch.equal(col_stats.cpu().double(), inliers.abs().amax(0))
    assert (out_row[:, [2, 9]] == 0).all()
    assert (out_col.cpu()[mask] == 0).all()


def test_int8_double_quant_threshold_column_quantization_matches_bitsandbytes(device):
    # bitsandbytes: col_q = round(A.masked_fill(|A| >= t, 0) * 127 / col_stats): only outlier ENTRIES are zeroed
    A = randn((10, 16), torch.float16, device, seed=19).clamp(-3, 3)
    A[1, 2] = 8.0
    A[7, 9] = -12.0
    _, out_col, _, col_stats, _ = F.int8_double_quant(A, threshold=6.0)
    inliers = A.cpu().double().masked_fill(A.cpu().abs() >= 6, 0)
    exact = 127 * inliers / col_stats.cpu().double()[None, :]
    assert ((out_col.cpu().double() - exact).abs() <= 0.5 + 1e-4).all()


def test_int8_linear_matmul_and_mm_dequant_wrappers(device):
    A = _randint8((6, 32), device, seed=20)
    B = _randint8((10, 32), device, seed=21)
    C = F.int8_linear_matmul(A, B)
    assert C.dtype == torch.int32
    assert torch.equal(C.cpu().long(), A.cpu().long() @ B.cpu().long().t())
    buffer = torch.empty(6, 10, dtype=torch.int32, device=device)
    assert F.int8_linear_matmul(A, B, out=buffer) is buffer and torch.equal(buffer, C)
    with pytest.raises(TypeError, match="dtype"):
        F.int8_linear_matmul(A, B, dtype=torch.float32)
    row_stats = torch.rand(6, device=device) + 0.5
    col_stats = torch.rand(10, device=device) + 0.5
    bias = torch.randn(10, device=device, dtype=torch.float16)
    out = F.int8_mm_dequant(C, row_stats, col_stats)
    assert out.dtype == torch.float16
    ref = C.cpu().double() * row_stats.cpu().double()[:, None] * col_stats.cpu().double()[None, :] / 127**2
    torch.testing.assert_close(out.cpu().double(), ref, rtol=_eps(torch.float16), atol=1e-3)
    with_bias = F.int8_mm_dequant(C, row_stats, col_stats, bias=bias)
    torch.testing.assert_close(with_bias.cpu().double(), ref + bias.cpu().double(), rtol=_eps(torch.float16),
                               atol=2e-3)  # fmt: skip
    buffer = torch.empty(6, 10, dtype=torch.bfloat16, device=device)
    result = F.int8_mm_dequant(C, row_stats, col_stats, out=buffer)
    assert result is buffer
    torch.testing.assert_close(buffer.cpu().double(), ref, rtol=_eps(torch.bfloat16), atol=1e-2)


def test_module_alias():
    assert bnb.functional is F
