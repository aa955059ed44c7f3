"""FSDP2 over torchlowbit's quantized weights: 2 ranks (gloo on CPU; NCCL on 2 GPUs where present)."""

import copy

import pytest
import torch
import torch.distributed as dist
from launch import BACKENDS, INTEGER_PARAMS, run
from models import int8_mlp, shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

import torchlowbit as bnb

STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NAN_PATTERNS = [0x7F81, 0xFFC1, 0x7FFF, 0xFF80 | 0x55, 0x7C01, 0xFE01]  # bf16 and fp16 NaN bit patterns


def _model4bit(device, storage: torch.dtype, nested: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    sizes = [(64, 128), (128, 64)]
    layers = [bnb.nn.LinearNF4(i, o, compress_statistics=nested, quant_storage=storage) for i, o in sizes]
    model = torch.nn.Sequential(*layers).to(device)
    packed = model[0].weight.packed.view(torch.uint8).view(-1)
    planted = torch.tensor(NAN_PATTERNS, dtype=torch.int32).view(torch.uint8).view(-1, 4)[:, :2].reshape(-1)
    for at in range(0, packed.numel() - planted.numel(), 97):  # NaN patterns in every storage dtype's view
        packed[at : at + planted.numel()] = planted
    return model


def _bytes(weight) -> dict[str, torch.Tensor]:
    return {name: t.cpu().view(torch.uint8).clone() for name, t in weight.inner().items() if t is not None}


def _forward_matches_unsharded(device, storage, nested, reshard, mixed, offload) -> None:
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reference = _model4bit(device, STORAGE[storage], nested)
    model = copy.deepcopy(reference)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
    offload_policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    shard(model, model, mesh, reshard_after_forward=reshard, mp_policy=mp_policy, offload_policy=offload_policy)
    x = torch.randn(3, 64, device=device)
    if mixed:  # FSDP casts the float parameters (the biases) and the inputs; the 4-bit codes stay as they are
        for layer in reference:
            layer.bias.data = layer.bias.data.bfloat16()
        x = x.bfloat16()
    expected = reference(x)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for ref_layer, layer in zip(reference, model, strict=True):
        layer.unshard()
        weight = layer.weight
        assert type(weight) is bnb.nn.Params4bit, type(weight)
        for name, want in _bytes(ref_layer.weight).items():
            assert torch.equal(_bytes(weight)[name], want), f"{name} bytes changed by all-gather"
        layer.reshard()
    rank, world = dist.get_rank(), dist.get_world_size()
    for ref_layer, layer in zip(reference, model, strict=True):
        local = layer.weight.to_local()
        rows = ref_layer.weight.shape[0] // world
        want = ref_layer.weight._slice_rows(rank * rows, (rank + 1) * rows)
        assert _bytes(local).keys() == _bytes(want).keys()
        assert all(torch.equal(_bytes(local)[k], v) for k, v in _bytes(want).items()), "shard bytes changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_4bit_forward_and_bytes(backend, storage, nested):
    if storage == "uint8" and not INTEGER_PARAMS:
        pytest.skip("this torch's FSDP2 cannot shard integer parameters; use a floating quant_storage")
    run(_forward_matches_unsharded, storage, nested, True, False, False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
@pytest.mark.parametrize("mixed", [True, False], ids=["bf16-params", "fp32"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
def test_4bit_policies(backend, reshard, mixed, offload):
    if offload and backend == "gloo":
        pytest.skip("FSDP2's CPUOffloadPolicy needs an accelerator")
    run(_forward_matches_unsharded, "bfloat16", True, reshard, mixed, offload, backend=backend)


def _int8_forward_matches_unsharded(device, reshard) -> None:
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reference = int8_mlp(device)
    model = copy.deepcopy(reference)
    shard(model, model, mesh, reshard_after_forward=reshard)
    x = torch.randn(3, 64, device=device)
    x[:, 5] = 8.0  # an outlier column: the 16-bit path runs too
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for ref_layer, layer in zip(reference, model, strict=True):
        layer.unshard()
        assert type(layer.weight) is bnb.nn.Int8Params
        assert torch.equal(layer.weight.CB, ref_layer.weight.CB) and torch.equal(layer.weight.SCB, ref_layer.weight.SCB)
        layer.reshard()
        rows = ref_layer.weight.shape[0] // dist.get_world_size()
        local = layer.weight.to_local()
        assert torch.equal(local.SCB, ref_layer.weight.SCB[dist.get_rank() * rows :][:rows])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_int8_forward(backend, reshard):
    if not INTEGER_PARAMS:
        pytest.skip("this torch's FSDP2 cannot shard integer parameters")
    run(_int8_forward_matches_unsharded, reshard, backend=backend)


def _uneven_shards_raise(device) -> None:
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    cases = [
        (bnb.nn.LinearNF4(64, 3, quant_storage=torch.bfloat16), "multiple of 16"),  # 96 rows: 48 cut a block
        (bnb.nn.LinearFP4(64, 5), "world sizes that work: [1, 5]"),  # 160 rows of 32-row blocks
        (bnb.nn.Linear8bitLt(64, 3, has_fp16_weights=False), "world sizes that work: [1, 3]"),
    ]
    for layer, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            fully_shard(layer.to(device), mesh=mesh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_that_cut_blocks_raise(backend):
    run(_uneven_shards_raise, backend=backend)
