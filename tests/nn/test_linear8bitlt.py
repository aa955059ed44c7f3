"""``Linear8bitLt`` / ``Int8Params``: the bitsandbytes ``tests/test_linear8bitlt.py`` contract on every device, and the
int8 checkpoint format of DESIGN.md.

Dropped from the seed: ``test_layout_exact_match`` (legacy tiled layouts are gone). Changed from the seed: loading an
int8 checkpoint with ``has_fp16_weights=False`` before moving to the device must work (the seed expected a
RuntimeError).
"""

import os
from tempfile import TemporaryDirectory

import pytest
import torch
from helpers import TRUE_FALSE, assert_same_state, id_formatter, randn, state_bytes

import torchlowbit as bnb
from torchlowbit.nn import Linear8bitLt

# --------------------------------------------------------------------------------------------------------
# The seeds
# --------------------------------------------------------------------------------------------------------


def test_linear_no_igemmlt(device):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 3072)
    x = torch.randn(3, 1024, dtype=torch.half)
    linear_custom = Linear8bitLt(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        has_fp16_weights=False,
        threshold=6.0,
    )
    linear_custom.state.force_no_igemmlt = True

    linear_custom.weight = bnb.nn.Int8Params(
        linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
    ).to(linear.weight.dtype)
    linear_custom.bias = linear.bias
    linear_custom = linear_custom.to(device)
    linear = linear.half().to(device)

    x_ref = x.clone().to(device).requires_grad_(True)
    x_ours = x.clone().to(device).requires_grad_(True)
    fx_ref = linear(x_ref).float()
    grad_proj = torch.randn_like(fx_ref)
    (fx_ref * grad_proj).mean().backward()

    fx_ours = linear_custom(x_ours).float()
    (fx_ours * grad_proj).mean().backward()
    assert torch.allclose(fx_ref, fx_ours, atol=0.02)
    assert torch.allclose(x_ref.grad, x_ours.grad, atol=0.01)
    assert not linear_custom.state.has_fp16_weights
    assert linear_custom.state.CB is not None
    assert linear_custom.state.CxB is None


@pytest.mark.parametrize("has_fp16_weights", TRUE_FALSE, ids=id_formatter("has_fp16_weights"))
@pytest.mark.parametrize("serialize_before_forward", TRUE_FALSE, ids=id_formatter("serialize_before_forward"))
@pytest.mark.parametrize("deserialize_before_cuda", TRUE_FALSE, ids=id_formatter("deserialize_before_cuda"))
@pytest.mark.parametrize("force_no_igemmlt", TRUE_FALSE, ids=id_formatter("force_no_igemmlt"))
def test_linear_serialization(device, has_fp16_weights, serialize_before_forward, deserialize_before_cuda,
                              force_no_igemmlt):  # fmt: skip
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 96)
    x = torch.randn(3, 32, dtype=torch.half)

    linear_custom = Linear8bitLt(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        has_fp16_weights=has_fp16_weights,
        threshold=6.0,
    )
    if force_no_igemmlt:
        linear_custom.state.force_no_igemmlt = True

    linear_custom.weight = bnb.nn.Int8Params(
        linear.weight.data.clone(), requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights
    )
    linear_custom.bias = linear.bias
    linear_custom = linear_custom.to(device)

    if serialize_before_forward:
        state_dict_8bit = linear_custom.state_dict()

    x_first = x.clone().to(device).requires_grad_(True)
    fx_first = linear_custom(x_first).float()
    grad_proj = torch.randn_like(fx_first)
    (fx_first * grad_proj).mean().backward()

    if not serialize_before_forward:
        state_dict_8bit = linear_custom.state_dict()

    with TemporaryDirectory() as tmpdir:
        state_path_8bit = os.path.join(tmpdir, "state_8bit.pth")
        state_path = os.path.join(tmpdir, "state.pth")

        torch.save(linear.state_dict(), state_path)
        torch.save(state_dict_8bit, state_path_8bit)

        if not has_fp16_weights:
            assert os.path.getsize(state_path_8bit) < 0.5 * os.path.getsize(state_path)

        new_state_dict = torch.load(state_path_8bit)

    new_linear_custom = Linear8bitLt(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        has_fp16_weights=has_fp16_weights,
        threshold=6.0,
    )
    if force_no_igemmlt:
        new_linear_custom.state.force_no_igemmlt = True

    if deserialize_before_cuda:
        # The seed expected a RuntimeError here for has_fp16_weights=False; loading before the move must work.
        new_linear_custom.load_state_dict(new_state_dict, strict=True)

    new_linear_custom = new_linear_custom.to(device)

    if not deserialize_before_cuda:
        new_linear_custom.load_state_dict(new_state_dict, strict=True)

    x_second = x.clone().to(device).requires_grad_(True)
    fx_second = new_linear_custom(x_second).float()
    (fx_second * grad_proj).mean().backward()

    # (the seed skipped this for has_fp16_weights=False with deserialize_before_cuda: now it must hold too)
    assert torch.allclose(fx_first, fx_second, atol=1e-5)
    assert torch.allclose(x_first.grad, x_second.grad, atol=1e-5)
    assert new_linear_custom.weight.device.type == torch.device(device).type
    assert isinstance(new_linear_custom.weight, bnb.nn.Int8Params) == (not has_fp16_weights)


# --------------------------------------------------------------------------------------------------------
# State-dict layout and checkpoints in the original format
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", TRUE_FALSE, ids=["bias", "no_bias"])
def test_state_dict_layout(device, bias):
    layer = Linear8bitLt(300, 200, bias=bias, has_fp16_weights=False, device=device)
    sd = layer.state_dict()
    expected = {"weight": ((200, 300), torch.int8), "SCB": ((200,), torch.float32), "weight_format": ((), torch.uint8)}
    if bias:
        expected["bias"] = ((200,), torch.float32)
    assert set(sd) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(sd[key].shape) == shape, key
        assert sd[key].dtype == dtype, key
        assert type(sd[key]) is torch.Tensor, f"{key} must be a plain tensor, got {type(sd[key]).__name__}"
    assert int(sd["weight_format"]) == 0
    assert sd["weight"].is_contiguous()  # row-major
    assert sd["weight"].device.type == torch.device(device).type


def test_state_dict_fp16_weights_is_plain_linear(device):
    layer = Linear8bitLt(64, 32, has_fp16_weights=True, device=device)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"}
    assert sd["weight"].dtype == torch.float32 and tuple(sd["weight"].shape) == (32, 64)


def _reference_int8(W: torch.Tensor):
    """Row-wise int8 as in DESIGN.md: scale = row absmax, q = round(127 * x / scale)."""
    scale = W.float().abs().amax(dim=1)
    q = torch.round(127 * W.float() / scale[:, None]).to(torch.int8)
    return q, scale


def test_load_original_format_checkpoint(device):
    W = randn((48, 80), seed=21)
    bias = randn((48,), seed=22)
    CB, SCB = _reference_int8(W)
    sd = {"weight": CB, "bias": bias, "SCB": SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    layer = Linear8bitLt(80, 48, has_fp16_weights=False, device=device)
    layer.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
    assert torch.equal(layer.weight.CB.cpu(), CB) and torch.equal(layer.weight.SCB.cpu(), SCB)
    dequantized = CB.float() * SCB[:, None] / 127
    torch.testing.assert_close(layer.weight.dequantize().float().cpu(), dequantized, rtol=1e-6, atol=1e-6)

    # the int8 path (threshold 0) and the fallback: close to x @ dequantized^T + b
    x = randn((5, 80), seed=23)
    expected = x @ dequantized.T + bias
    out = layer(x.to(device)).cpu()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05 * expected.abs().mean().item())
    layer.state.force_no_igemmlt = True
    torch.testing.assert_close(layer(x.to(device)).cpu(), expected, rtol=1e-4, atol=1e-4)

    # a checkpoint without weight_format (older files) loads too
    other = Linear8bitLt(80, 48, has_fp16_weights=False, device=device)
    other.load_state_dict({k: v.to(device) for k, v in sd.items() if k != "weight_format"}, strict=True)
    assert torch.equal(other.weight, layer.weight)


def test_save_original_format_checkpoint(device):
    W = randn((48, 80), seed=21)
    CB, SCB = _reference_int8(W)
    layer = Linear8bitLt(80, 48, has_fp16_weights=False, device="meta")
    layer.weight = bnb.nn.Int8Params(W.to(device), has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(torch.zeros(48, device=device))
    sd = layer.state_dict()
    assert torch.equal(sd["weight"].cpu(), CB)
    torch.testing.assert_close(sd["SCB"].cpu(), SCB, rtol=0, atol=0)


@pytest.mark.parametrize("load_before_move", TRUE_FALSE, ids=["load_then_move", "move_then_load"])
def test_load_state_dict_before_or_after_move(device, load_before_move):
    src = Linear8bitLt(64, 48, has_fp16_weights=False, threshold=6.0, device=device)
    sd = src.state_dict()
    dst = Linear8bitLt(64, 48, has_fp16_weights=False, threshold=6.0)
    if load_before_move:
        dst.load_state_dict(sd, strict=True)
        dst = dst.to(device)
    else:
        dst.to(device).load_state_dict(sd, strict=True)
    assert dst.weight.device.type == torch.device(device).type
    assert_same_state(state_bytes(src), state_bytes(dst))
    x = randn((4, 64), torch.float16, device=device, seed=1)
    assert torch.equal(dst(x), src(x))


def test_load_float_checkpoint_quantizes(device):
    linear = torch.nn.Linear(64, 32)
    layer = Linear8bitLt(64, 32, has_fp16_weights=False, device=device)
    layer.load_state_dict(linear.state_dict(), strict=True)
    assert isinstance(layer.weight, bnb.nn.Int8Params)
    CB, SCB = _reference_int8(linear.weight.data)
    assert torch.equal(layer.weight.CB.cpu(), CB)
    torch.testing.assert_close(layer.weight.SCB.cpu(), SCB, rtol=0, atol=0)


def _mismatched_checkpoints():
    g = torch.Generator().manual_seed(3)

    def fresh(out=48):
        layer = Linear8bitLt(64, out, has_fp16_weights=False)
        with torch.no_grad():
            layer.bias.copy_(torch.randn(out, generator=g))
        return layer.state_dict()

    def without(key):
        sd = fresh()
        del sd[key]
        return sd

    return {
        "shape": lambda: fresh(out=40),
        "missing_SCB": lambda: without("SCB"),
        "missing_weight": lambda: without("weight"),
        "tiled_format": lambda: {**fresh(), "weight_format": torch.tensor(1, dtype=torch.uint8)},
    }


MISMATCH_MESSAGES = {
    "shape": "shape",
    "missing_SCB": "SCB",
    "missing_weight": "weight",
    "tiled_format": "weight_format",
}


@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_mismatched_checkpoint_raises_and_keeps_weight(device, case):
    layer = Linear8bitLt(64, 48, has_fp16_weights=False, device=device)
    CB, SCB = layer.weight.CB.clone(), layer.weight.SCB.clone()
    with pytest.raises(RuntimeError, match=MISMATCH_MESSAGES[case]):
        layer.load_state_dict({k: v.to(device) for k, v in _mismatched_checkpoints()[case]().items()}, strict=True)
    assert torch.equal(layer.weight.CB, CB) and torch.equal(layer.weight.SCB, SCB)


@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_mismatched_checkpoint_leaves_module_state_unchanged(device, case):
    layer = Linear8bitLt(64, 48, has_fp16_weights=False, device=device)
    before = state_bytes(layer)
    with pytest.raises(RuntimeError):
        layer.load_state_dict({k: v.to(device) for k, v in _mismatched_checkpoints()[case]().items()}, strict=True)
    assert_same_state(before, state_bytes(layer))


def test_int8_checkpoint_into_fp16_weights_layer_raises(device):
    sd = Linear8bitLt(64, 48, has_fp16_weights=False, device=device).state_dict()
    layer = Linear8bitLt(64, 48, has_fp16_weights=True, device=device)
    weight = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="has_fp16_weights"):
        layer.load_state_dict(sd, strict=True)
    assert torch.equal(layer.weight, weight)


# --------------------------------------------------------------------------------------------------------
# Int8Params
# --------------------------------------------------------------------------------------------------------


def test_int8params_quantizes_rowwise(device):
    W = randn((32, 64), torch.float16, device=device, seed=5)
    p = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    CB, SCB = _reference_int8(W.cpu())
    assert p.dtype == torch.int8 and tuple(p.shape) == (32, 64) and not p.requires_grad
    assert torch.equal(p.CB.cpu(), CB)
    torch.testing.assert_close(p.SCB.cpu(), SCB, rtol=0, atol=0)
    assert p.dequantize().dtype == torch.float16
    torch.testing.assert_close(p.dequantize().float(), W.float(), rtol=0, atol=SCB.max().item() / 127)


def test_int8params_fp16_weights_is_a_float_parameter():
    W = torch.randn(8, 16)
    p = bnb.nn.Int8Params(W, requires_grad=True, has_fp16_weights=True)
    assert type(p) is torch.nn.Parameter and p.requires_grad and p.dtype == torch.float32


def test_int8params_rejects_bad_data():
    with pytest.raises(ValueError):
        bnb.nn.Int8Params(torch.randn(4, 4, 4), has_fp16_weights=False)
    with pytest.raises(ValueError):
        bnb.nn.Int8Params(torch.randint(0, 3, (4, 4)), has_fp16_weights=False)
    with pytest.raises(ValueError):
        bnb.nn.Int8Params.from_quantized(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
