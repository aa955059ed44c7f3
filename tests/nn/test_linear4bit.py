"""``Linear4bit`` / ``Params4bit``: the bitsandbytes ``tests/test_linear4bit.py`` contract, ported to every device,
plus the checkpoint format of DESIGN.md (state-dict layout, hand-built bitsandbytes checkpoints, bad checkpoints).
"""

import json
import math
import os
from tempfile import TemporaryDirectory

import pytest
import torch
from helpers import CODES, FP4, NF4, TRUE_FALSE, assert_same_state, randn, raw_bytes, state_bytes

import torchlowbit as bnb

storage = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


# --------------------------------------------------------------------------------------------------------
# The seed: bitsandbytes tests/test_linear4bit.py::test_linear_serialization, on every device
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_storage", ["uint8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bias", TRUE_FALSE, ids=["bias", "no_bias"])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear_serialization(device, quant_type, compress_statistics, bias, quant_storage):
    original_dtype = torch.float16
    compute_dtype = None
    layer_shape = (300, 400)
    torch.manual_seed(0)

    linear = torch.nn.Linear(*layer_shape, dtype=original_dtype, device="cpu")  # original layer

    # Quantizing original layer
    linear_q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        device="meta",
    )
    # (the seed leaves compress_statistics at its default here, so its "plain" cases were nested)
    new_weight = bnb.nn.Params4bit(
        data=linear.weight, quant_type=quant_type, compress_statistics=compress_statistics, requires_grad=False
    )
    linear_q.weight = new_weight
    if bias:
        linear_q.bias = torch.nn.Parameter(linear.bias)
    linear_q = linear_q.to(device)

    # saving to state_dict:
    sd = linear_q.state_dict()

    # restoring from state_dict:
    bias_data2 = sd.pop("bias", None)
    weight_data2 = sd.pop("weight")
    # bitsandbytes defaults to device="cuda"; the port names the device under test
    weight2 = bnb.nn.Params4bit.from_prequantized(quantized_stats=sd, data=weight_data2, device=device)

    # creating new layer with same params:
    linear_q2 = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        device="meta",
    )
    # loading weights from state_dict:
    linear_q2.weight = weight2
    if bias:
        linear_q2.bias = torch.nn.Parameter(bias_data2)
    linear_q2 = linear_q2.to(device)

    # MATCHING
    a, b = linear_q.weight, linear_q2.weight

    # Quantizing original layer with specified quant_storage type
    linear_qs = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=storage[quant_storage],
        device="meta",
    )
    linear_qs.weight = bnb.nn.Params4bit(
        data=linear.weight, requires_grad=False, quant_type=quant_type, quant_storage=storage[quant_storage],
        compress_statistics=compress_statistics,
    )  # fmt: skip
    if bias:
        linear_qs.bias = torch.nn.Parameter(linear.bias)
    linear_qs = linear_qs.to(device)

    assert a.device == b.device
    assert a.dtype == b.dtype
    assert torch.equal(a, b)

    q0 = a.quant_state
    q1 = b.quant_state
    for attr in ("code", "dtype", "blocksize", "absmax"):
        c, d = getattr(q0, attr), getattr(q1, attr)
        if isinstance(c, torch.Tensor):
            assert torch.equal(c, d)
        else:
            assert c == d, f"{c} != {d}"

    if q0.state2 is not None:
        for attr in ("code", "dtype", "blocksize", "absmax"):
            c, d = getattr(q0.state2, attr), getattr(q1.state2, attr)
            if isinstance(c, torch.Tensor):
                assert torch.equal(c, d)
            else:
                assert c == d, f"{c} != {d}"

    if bias:
        a, b = linear_q.bias, linear_q2.bias
        assert a.device == b.device
        assert a.dtype == b.dtype
        assert torch.equal(a, b)

    # Forward test
    x = torch.rand(42, layer_shape[0], device=device)
    a = linear_q(x)
    b = linear_q2(x)
    c = linear_qs(x)
    assert a.device == b.device
    assert a.dtype == b.dtype
    assert a.device == c.device
    assert a.dtype == c.dtype
    assert torch.equal(a, b)
    assert torch.equal(a, c)

    # Test moving to CPU and back to the device
    linear_q2.to("cpu")
    linear_q2.to(device)
    d = linear_qs(x)
    assert c.dtype == d.dtype
    assert c.device == d.device
    assert torch.equal(c, d)
    # (the seed re-runs linear_qs; the layer that made the round trip is linear_q2)
    e = linear_q2(x)
    assert e.dtype == a.dtype and e.device == a.device
    assert torch.equal(a, e)

    # Saved size ratio test. Target set for layer_shape == (300, 400) w/ bias
    with TemporaryDirectory() as tmpdir:
        state_path_4bit = os.path.join(tmpdir, "state_4bit.pth")
        state_path = os.path.join(tmpdir, "state.pth")
        torch.save(linear.state_dict(), state_path)
        torch.save(linear_q.state_dict(), state_path_4bit)

        size_orig, size_4 = os.path.getsize(state_path), os.path.getsize(state_path_4bit)
        size_ratio = size_4 / size_orig
        # these numbers get lower as weight shape increases
        target_compression = 0.143 if original_dtype == torch.float32 else 0.29
        if not compress_statistics:  # a float32 absmax per 64 weights: 0.5625 bytes a weight instead of ~0.51
            target_compression += 0.01
        ratio_error_msg = (
            f"quantized_size {size_4:,} is larger on disk than {target_compression:.2%} of original size {size_orig:,}"
        )
        assert size_ratio < target_compression, ratio_error_msg


# --------------------------------------------------------------------------------------------------------
# State-dict layout (DESIGN.md: out=200, in=300, nf4, blocksize 64)
# --------------------------------------------------------------------------------------------------------


def _decode_json(t: torch.Tensor) -> dict:
    assert t.dtype == torch.uint8 and t.dim() == 1
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_layout(device, quant_type, compress_statistics, quant_storage):
    layer = bnb.nn.Linear4bit(
        300, 200, quant_type=quant_type, compress_statistics=compress_statistics, quant_storage=quant_storage,
        device=device,
    )  # fmt: skip
    sd = layer.state_dict()
    qs_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    expected = {
        "weight": ((30000, 1), torch.uint8) if quant_storage == torch.uint8 else ((15000, 1), torch.bfloat16),
        "bias": ((200,), torch.float32),
        "weight.absmax": ((938,), torch.uint8 if compress_statistics else torch.float32),
        "weight.quant_map": ((16,), torch.float32),
    }
    if compress_statistics:
        expected["weight.nested_absmax"] = ((4,), torch.float32)
        expected["weight.nested_quant_map"] = ((256,), torch.float32)
    assert set(sd) == set(expected) | {qs_key}
    assert next(iter(sd)) == "weight"
    for key, (shape, dtype) in expected.items():
        assert tuple(sd[key].shape) == shape, key
        assert sd[key].dtype == dtype, key
        assert type(sd[key]) is torch.Tensor, f"{key} must be a plain tensor, got {type(sd[key]).__name__}"
        assert sd[key].device.type == torch.device(device).type, key
    assert torch.equal(sd["weight.quant_map"].cpu(), torch.tensor(CODES[quant_type]))

    info = _decode_json(sd[qs_key])
    assert {k: info[k] for k in ("quant_type", "blocksize", "dtype", "shape")} == {
        "quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": [200, 300],
    }  # fmt: skip
    if compress_statistics:
        assert set(info) == {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                             "nested_offset"}  # fmt: skip
        assert info["nested_blocksize"] == 256 and info["nested_dtype"] == "float32"
        assert isinstance(info["nested_offset"], float)
        assert info["nested_offset"] == pytest.approx(layer.weight.quant_state.offset.item())
        dyn = sd["weight.nested_quant_map"].cpu()
        assert torch.all(dyn[1:] >= dyn[:-1]) and int((dyn == 0).sum()) == 1
        assert dyn[-1].item() == 1.0 and dyn[0].item() == pytest.approx(-0.99297, abs=1e-5)
    else:
        assert set(info) == {"quant_type", "blocksize", "dtype", "shape"}

    # the state dict holds tensors only, and a torch.load(weights_only=True) round trip rebuilds the layer
    with TemporaryDirectory() as tmpdir:
        path = os.path.join(tmpdir, "sd.pth")
        torch.save(sd, path)
        loaded = torch.load(path, weights_only=True, map_location=device)
    other = bnb.nn.Linear4bit(300, 200, quant_type=quant_type, compress_statistics=compress_statistics,
                              quant_storage=quant_storage, device=device)  # fmt: skip
    result = other.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = randn((5, 300), device=device, seed=3)
    assert torch.equal(other(x), layer(x))


def test_state_dict_original_dtype_in_json(device):
    """The quant state records the dtype of the weight that was quantized (here fp16 and bf16)."""
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(randn((32, 64), dtype, device=device), quant_type="nf4")
        layer.bias = torch.nn.Parameter(torch.zeros(32, dtype=dtype, device=device))
        info = _decode_json(layer.state_dict()["weight.quant_state.bitsandbytes__nf4"])
        assert info["dtype"] == name
        assert layer.weight.dequantize().dtype == dtype


# --------------------------------------------------------------------------------------------------------
# Checkpoints in the original library's format, built by hand from the format facts
# --------------------------------------------------------------------------------------------------------


def _dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), written out."""
    data = []
    for i in range(7):
        fraction_items = 2**i + 1
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    distance = (values[:, None] - table[None, :]).abs()
    top2 = distance.topk(2, dim=1, largest=False).values
    # the test data must not sit on a rounding midpoint, where implementations may legitimately differ
    assert bool((top2[:, 1] - top2[:, 0] > 1e-5).all()), "test weight too close to a rounding midpoint"
    return distance.argmin(dim=1)


def _encode_4bit(normalized: torch.Tensor, quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return _nearest(normalized, torch.tensor(NF4))
    # FP4: bit 3 is the sign, bits 0..2 index the magnitude
    magnitudes = torch.tensor(FP4[:8])
    return _nearest(normalized.abs(), magnitudes) | ((normalized < 0).long() << 3)


def _reference_checkpoint(W: torch.Tensor, bias: torch.Tensor, quant_type: str, nested: bool):
    """(state dict, dequantized weight) of ``W`` as bitsandbytes writes a Linear4bit with blocksize 64."""
    blocksize = 64
    table = torch.tensor(CODES[quant_type])
    flat = W.float().reshape(-1)
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # per-block absmax
    normalized = (padded * (1.0 / absmax)[:, None]).reshape(-1)[:n]
    codes = _encode_4bit(normalized, quant_type)
    zero_code = CODES[quant_type].index(0.0)  # the pad nibble of an odd count holds the code of 0.0
    codes = torch.cat([codes, torch.full(((n % 2),), zero_code, dtype=torch.long)])
    pairs = codes.view(-1, 2)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8).view(-1, 1)  # first element in the high nibble

    info = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(W.dtype).removeprefix("torch."),
            "shape": list(W.shape)}  # fmt: skip
    sd = {"weight": packed, "bias": bias.clone()}
    if nested:
        dyn = _dynamic_map_signed()
        offset = absmax.mean()
        centered = absmax - offset
        nested_blocks = math.ceil(blocks / 256)
        centered_padded = torch.nn.functional.pad(centered, (0, nested_blocks * 256 - blocks)).view(nested_blocks, 256)
        nested_absmax = centered_padded.abs().amax(dim=1)
        scaled = (centered_padded * (1.0 / nested_absmax)[:, None]).reshape(-1)[:blocks]
        qabsmax = _nearest(scaled, dyn)
        used_absmax = dyn[qabsmax] * nested_absmax.repeat_interleave(256)[:blocks] + offset.item()
        sd["weight.absmax"] = qabsmax.to(torch.uint8)
        sd["weight.quant_map"] = table.clone()
        sd["weight.nested_absmax"] = nested_absmax
        sd["weight.nested_quant_map"] = dyn
        info.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset.item()})
    else:
        used_absmax = absmax
        sd["weight.absmax"] = absmax
        sd["weight.quant_map"] = table.clone()
    sd[f"weight.quant_state.bitsandbytes__{quant_type}"] = torch.tensor(
        list(json.dumps(info).encode("utf-8")), dtype=torch.uint8
    )
    dequantized = (table[codes[:n]] * used_absmax.repeat_interleave(blocksize)[:n]).to(W.dtype).view(W.shape)
    return sd, dequantized


@pytest.mark.parametrize("nested", TRUE_FALSE, ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_load_original_format_checkpoint(device, quant_type, nested):
    out_features, in_features = 21, 75  # 1575 elements: 25 blocks of 64 (the last partial), an odd count
    W = randn((out_features, in_features), torch.float16, seed=11, scale=0.05)
    bias = randn((out_features,), torch.float16, seed=12, scale=0.1)
    sd, expected_weight = _reference_checkpoint(W, bias, quant_type, nested)

    layer = bnb.nn.Linear4bit(in_features, out_features, quant_type=quant_type, compress_statistics=nested,
                              device=device)  # fmt: skip
    layer.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
    weight = layer.weight
    assert isinstance(weight, bnb.nn.Params4bit)
    assert weight.logical_shape == (out_features, in_features)
    assert weight.quant_type == quant_type and weight.blocksize == 64 and weight.compress_statistics == nested
    assert weight.device.type == torch.device(device).type
    dequantized = weight.dequantize()
    assert dequantized.dtype == torch.float16
    assert torch.equal(dequantized.cpu(), expected_weight)

    # outputs: x @ W^T + b with the dequantized weight (up to its rounding to the fp16 of the checkpoint)
    x = randn((4, in_features), torch.float32, seed=13)
    expected = x @ expected_weight.float().T + bias.float()
    out = layer(x.to(device))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)

    # the same checkpoint through Params4bit.from_prequantized, and with compact JSON separators
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    qs_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    compact = json.dumps(_decode_json(stats[qs_key]), separators=(",", ":")).encode("utf-8")
    stats[qs_key] = torch.tensor(list(compact), dtype=torch.uint8)
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device)
    assert torch.equal(p.dequantize().cpu(), expected_weight)


@pytest.mark.parametrize("nested", TRUE_FALSE, ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_save_original_format_checkpoint(device, quant_type, nested):
    out_features, in_features = 21, 75
    W = randn((out_features, in_features), torch.float16, seed=11, scale=0.05)
    bias = randn((out_features,), torch.float16, seed=12, scale=0.1)
    expected, _ = _reference_checkpoint(W, bias, quant_type, nested)

    layer = bnb.nn.Linear4bit(in_features, out_features, quant_type=quant_type, compress_statistics=nested,
                              device="meta")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(W.to(device), quant_type=quant_type, compress_statistics=nested)
    layer.bias = torch.nn.Parameter(bias.to(device))
    sd = layer.state_dict()
    assert list(sd) == list(expected)  # same keys, in bitsandbytes' order
    qs_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    for key, value in expected.items():
        got = sd[key]
        assert got.dtype == value.dtype and tuple(got.shape) == tuple(value.shape) or key == qs_key, key
        if key == qs_key:
            ours, theirs = _decode_json(got), _decode_json(value)
            assert ours.keys() == theirs.keys()
            for k in theirs:
                if k == "nested_offset":
                    assert ours[k] == pytest.approx(theirs[k], rel=1e-6, abs=0)
                else:
                    assert ours[k] == theirs[k], k
        elif key == "weight.nested_absmax":
            # max |absmax - mean(absmax)|: the mean's summation order may differ by device in the last bit
            torch.testing.assert_close(got.cpu(), value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(got.cpu(), value), key


# --------------------------------------------------------------------------------------------------------
# Loading: before or after moving, across quant_storage, strict; bad checkpoints change nothing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load_before_move", TRUE_FALSE, ids=["load_then_move", "move_then_load"])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=["nested", "plain"])
def test_load_state_dict_before_or_after_move(device, compress_statistics, load_before_move):
    torch.manual_seed(1)
    src = bnb.nn.LinearNF4(96, 48, compress_statistics=compress_statistics, device=device)
    sd = src.state_dict()
    dst = bnb.nn.LinearNF4(96, 48, compress_statistics=compress_statistics)  # built on the CPU
    if load_before_move:
        assert not dst.load_state_dict(sd, strict=True).missing_keys
        dst = dst.to(device)
    else:
        dst = dst.to(device)
        dst.load_state_dict(sd, strict=True)
    assert dst.weight.device.type == torch.device(device).type
    assert torch.equal(dst.weight, src.weight)
    x = randn((3, 96), device=device, seed=5)
    assert torch.equal(dst(x), src(x))
    assert_same_state(state_bytes(src), state_bytes(dst))


_STORAGES = {torch.uint8: "uint8", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.mark.parametrize(
    ("source_storage", "target_storage"),
    [
        pytest.param(s, t, id=f"{_STORAGES[s]}-to-{_STORAGES[t]}")
        for s in (torch.uint8, torch.bfloat16)
        for t in _STORAGES
    ],
)
def test_load_state_dict_across_quant_storage(device, source_storage, target_storage):
    src = bnb.nn.LinearNF4(128, 32, quant_storage=source_storage, device=device)
    dst = bnb.nn.LinearNF4(128, 32, quant_storage=target_storage, device=device)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.weight.quant_storage == target_storage
    assert raw_bytes(dst.weight.packed).equal(raw_bytes(src.weight.packed))
    x = randn((2, 128), device=device, seed=2)
    assert torch.equal(dst(x), src(x))


def test_load_float_checkpoint_quantizes(device):
    """A plain nn.Linear checkpoint (float weight) is quantized into the layer's format on load."""
    linear = torch.nn.Linear(128, 64)
    layer = bnb.nn.LinearNF4(128, 64, device=device)
    layer.load_state_dict(linear.state_dict(), strict=True)
    expected = bnb.nn.Params4bit(linear.weight.data.to(device), quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight, expected)
    assert torch.equal(layer.bias.cpu(), linear.bias.data)


def _mismatched_checkpoints():
    g = torch.Generator().manual_seed(7)

    def fresh(**kwargs):
        layer = bnb.nn.Linear4bit(300, 200, **{"quant_type": "nf4", **kwargs})
        with torch.no_grad():
            layer.bias.copy_(torch.randn(200, generator=g))  # a bias that differs from the target's
        return layer

    def bs128():
        layer = fresh()
        layer.weight = bnb.nn.Params4bit(torch.randn(200, 300, generator=g), quant_type="nf4", blocksize=128)
        return layer.state_dict()

    def without(key):
        sd = fresh().state_dict()
        del sd[key]
        return sd

    def replaced(key, value):
        return {**fresh().state_dict(), key: value}

    return {
        "quant_type": lambda: fresh(quant_type="fp4").state_dict(),
        "missing_nested_absmax": lambda: without("weight.nested_absmax"),
        "short_absmax": lambda: replaced("weight.absmax", torch.zeros(3, dtype=torch.uint8)),
        "float_absmax_nested": lambda: replaced("weight.absmax", torch.ones(938)),
        "codes_cast_to_bf16": lambda: replaced("weight", fresh().state_dict()["weight"].to(torch.bfloat16)),
        "shape": lambda: bnb.nn.Linear4bit(300, 100, quant_type="nf4").state_dict(),
        "blocksize": bs128,
        "missing_absmax": lambda: without("weight.absmax"),
        "missing_quant_state": lambda: without("weight.quant_state.bitsandbytes__nf4"),
        "missing_weight": lambda: without("weight"),
        "unknown_quant_type": lambda: {
            **{k: v for k, v in without("weight.quant_state.bitsandbytes__nf4").items()},
            "weight.quant_state.bitsandbytes__int4": torch.tensor(
                list(b'{"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [200, 300]}'),
                dtype=torch.uint8,
            ),
        },
    }


MISMATCH_MESSAGES = {
    "quant_type": "quant_type",
    "missing_nested_absmax": "needs all of .*missing ..nested_absmax",
    "short_absmax": "weight.absmax must have 938 elements",
    "float_absmax_nested": "weight.absmax must have dtype",
    "codes_cast_to_bf16": "weight.packed",
    "shape": "shape",
    "blocksize": "blocksize",
    "missing_absmax": "absmax",
    "missing_quant_state": "quant_state",
    "missing_weight": "weight",
    "unknown_quant_type": "int4|quant_state|bitsandbytes__",
}


@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_mismatched_checkpoint_raises_and_keeps_weight(device, case):
    layer = bnb.nn.Linear4bit(300, 200, quant_type="nf4", device=device)
    weight_before = {k: raw_bytes(v) for k, v in layer.weight.inner().items() if v is not None}
    meta_before = layer.weight.meta
    sd = _mismatched_checkpoints()[case]()
    with pytest.raises(RuntimeError, match=MISMATCH_MESSAGES[case]):
        layer.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
    assert layer.weight.meta == meta_before
    weight_after = {k: raw_bytes(v) for k, v in layer.weight.inner().items() if v is not None}
    assert weight_before.keys() == weight_after.keys()
    assert all(torch.equal(weight_before[k], weight_after[k]) for k in weight_before)


@pytest.mark.parametrize(
    "case",
    list(MISMATCH_MESSAGES),
)
def test_mismatched_checkpoint_leaves_module_state_unchanged(device, case):
    layer = bnb.nn.Linear4bit(300, 200, quant_type="nf4", device=device)
    before = state_bytes(layer)
    sd = _mismatched_checkpoints()[case]()
    with pytest.raises(RuntimeError):
        layer.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
    assert_same_state(before, state_bytes(layer))


def test_safetensors_round_trip(device):
    safetensors_torch = pytest.importorskip("safetensors.torch")  # a test extra; skipped only outside it
    layer = bnb.nn.LinearNF4(128, 64, device=device)
    with TemporaryDirectory() as tmpdir:
        path = os.path.join(tmpdir, "layer.safetensors")
        safetensors_torch.save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, path)
        sd = safetensors_torch.load_file(path, device=str(device))
    other = bnb.nn.LinearNF4(128, 64, device=device)
    other.load_state_dict(sd, strict=True)
    x = randn((3, 128), device=device)
    assert torch.equal(other(x), layer(x))


# --------------------------------------------------------------------------------------------------------
# Params4bit
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_params4bit_matches_functional(device, quant_type, compress_statistics):
    W = randn((64, 96), torch.bfloat16, device=device, seed=4)
    p = bnb.nn.Params4bit(W, quant_type=quant_type, compress_statistics=compress_statistics)
    packed, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=compress_statistics,
                                                 quant_type=quant_type)  # fmt: skip
    assert not p.requires_grad
    assert p.logical_shape == (64, 96) and p.dtype == torch.uint8 and tuple(p.shape) == (3072, 1)
    assert torch.equal(p.packed, packed)
    assert p.quant_state == state
    assert torch.equal(p.dequantize(), bnb.functional.dequantize_4bit(packed, state))
    assert p.dequantize().dtype == torch.bfloat16


def test_params4bit_rejects_requires_grad_and_unknown_settings():
    W = torch.randn(16, 64)
    with pytest.raises(ValueError):
        bnb.nn.Params4bit(W, requires_grad=True)
    with pytest.raises(ValueError, match="quant_type"):
        bnb.nn.Params4bit(W, quant_type="int4")
    with pytest.raises(ValueError, match="quant_type"):
        bnb.nn.Linear4bit(64, 16, quant_type="nf5")
    with pytest.raises(ValueError, match="quant_type"):
        bnb.nn.Linear4bit(64, 16, quant_type="nf5", device="meta")
    with pytest.raises((TypeError, ValueError), match="quant_storage"):
        bnb.nn.Params4bit(W, quant_storage=torch.int32)


def test_from_prequantized_rejects_inconsistent_data(device):
    layer = bnb.nn.LinearNF4(128, 64, device=device)
    sd = layer.state_dict()
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    with pytest.raises(ValueError):
        bnb.nn.Params4bit.from_prequantized(sd["weight"][:-1], stats, device=device)


@pytest.mark.parametrize(
    "how",
    ["detach", "data", "direct"],
)
def test_copy_float_into_nested_weight(device, how):
    """``weight.detach().copy_(W)`` (as the seeds do) must make the weight equal to a fresh quantization of W."""
    layer = bnb.nn.LinearNF4(83, 10, compress_statistics=True, device=device)
    W = randn((10, 83), device=device, seed=9)
    if how == "detach":
        layer.weight.detach().copy_(W)
    elif how == "data":
        layer.weight.data.copy_(W)
    else:
        with torch.no_grad():
            layer.weight.copy_(W)
    expected = bnb.nn.Params4bit(W, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight.dequantize(), expected.dequantize())
    assert torch.equal(layer.weight, expected)
