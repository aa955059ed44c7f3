"""Checkpoints of FSDP2-sharded quantized models and 8-bit optimizers: full state dicts in the DESIGN.md layout,
``torch.distributed.checkpoint`` save/load resharded between 2 ranks and 1, and per-rank memory."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from launch import BACKENDS, INTEGER_PARAMS, run
from models import int8_mlp, shard
from tiny_llama import TinyLlama, loss_fn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

import torchlowbit as bnb

TRAINED, RESUMED = 3, 3
TOKENS = torch.randint(0, 256, (TRAINED + RESUMED, 4, 17), generator=torch.Generator().manual_seed(1))


def _sharded(device, seed: int):
    torch.manual_seed(seed)
    model = TinyLlama().to(device)
    shard(model, model.blocks, init_device_mesh(device.type, (dist.get_world_size(),)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.AdamW8bit(trainable, lr=1e-2, min_8bit_size=1024)


def _train(model, optimizer, steps: range, device) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in steps:
        loss = loss_fn(model, TOKENS[step, rank::world].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach() / world)
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    return losses.cpu()


def _states(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def _job(device, load_from: str | None, save_to: str | None, losses_file: str) -> None:
    """Train (or load a checkpoint), optionally save, then record the losses of the resumed steps."""
    model, optimizer = _sharded(device, seed=1 if load_from else 0)  # a loaded model starts from other weights
    if load_from:
        states = _states(model, optimizer)
        dcp.load(states, checkpoint_id=load_from)
        set_model_state_dict(model, states["model"])
        set_optimizer_state_dict(model, optimizer, states["optim"])
    else:
        _train(model, optimizer, range(TRAINED), device)
    if save_to:
        dcp.save(_states(model, optimizer), checkpoint_id=save_to)
    losses = _train(model, optimizer, range(TRAINED, TRAINED + RESUMED), device)
    if dist.get_rank() == 0:
        torch.save(losses, losses_file)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 2)], ids=["2to1", "1to2", "2to2"])
def test_dcp_reshards_model_and_8bit_optimizer(backend, worlds, tmp_path):
    saved, resumed = str(tmp_path / "saved.pt"), str(tmp_path / "resumed.pt")
    run(_job, None, str(tmp_path / "ckpt"), saved, backend=backend, world_size=worlds[0])
    run(_job, str(tmp_path / "ckpt"), None, resumed, backend=backend, world_size=worlds[1])
    expected, got = torch.load(saved), torch.load(resumed)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _full_state_dict_layout(device) -> None:
    torch.manual_seed(0)
    reference = TinyLlama().to(device)
    model, _ = _sharded(device, seed=0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = reference.state_dict()
    assert full.keys() == expected.keys()
    for key, value in expected.items():
        assert full[key].dtype == value.dtype and full[key].shape == value.shape, key
        assert torch.equal(full[key].cpu().view(torch.uint8), value.cpu().view(torch.uint8)), key
    info = bnb.functional._unpack_dict(full["blocks.0.qkv.base.weight.quant_state.bitsandbytes__nf4"])
    assert info["shape"] == [192, 64] and info["quant_type"] == "nf4"


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_state_dict_has_the_unsharded_layout(backend):
    run(_full_state_dict_layout, backend=backend)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _state_bytes(optimizer) -> int:
    """Bytes of the per-parameter states (the 256-entry maps and the step count excluded)."""
    states = [
        (k, t.to_local() if hasattr(t, "to_local") else t) for s in optimizer.state.values() for k, t in s.items()
    ]
    return _bytes(t for k, t in states if k not in ("qmap1", "qmap2", "step"))


def _per_rank_memory(device) -> None:
    world = dist.get_world_size()
    torch.manual_seed(0)
    whole = TinyLlama().to(device)
    whole_optimizer = bnb.optim.AdamW8bit([p for p in whole.parameters() if p.requires_grad], min_8bit_size=1024)
    model, optimizer = _sharded(device, seed=0)
    for m, opt in ((whole, whole_optimizer), (model, optimizer)):
        loss_fn(m, TOKENS[0].to(device)).backward()
        opt.step()
    weights = [m.weight for m in whole.modules() if isinstance(m, bnb.nn.Linear4bit)]
    shards = [m.weight.to_local() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    total, local = (sum(_bytes(w.inner().values()) for w in ws) for ws in (weights, shards))
    whole_on_every_rank = sum(_bytes([w.nested_absmax, w.nested_code, w.nested_offset]) for w in weights)
    assert local == (total - whole_on_every_rank) / world + whole_on_every_rank  # the second-level scales
    local_state = torch.tensor(_state_bytes(optimizer), device=device)
    summed = local_state.clone()
    dist.all_reduce(summed)
    whole_state = _state_bytes(whole_optimizer)
    assert whole_state <= summed <= 1.02 * whole_state, (int(summed), whole_state)
    assert local_state <= 1.1 * whole_state / world


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_rank_memory_is_a_shard(backend):
    run(_per_rank_memory, backend=backend)


def _int8_checkpoint_round_trip(device, path: str) -> None:
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reference = int8_mlp(device, seed=0)
    model, fresh = int8_mlp(device, seed=0), int8_mlp(device, seed=1)
    for m in (model, fresh):
        shard(m, m, mesh)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = reference.state_dict()
    assert full.keys() == expected.keys() and {"0.SCB", "0.weight_format"} <= full.keys()
    assert all(torch.equal(full[k].cpu(), v.cpu()) for k, v in expected.items())
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    states = get_model_state_dict(fresh)
    dcp.load(states, checkpoint_id=path)
    set_model_state_dict(fresh, states)
    x = torch.randn(3, 64, device=device)
    torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_full_state_dict_and_dcp(backend, tmp_path):
    if not INTEGER_PARAMS:
        pytest.skip("this torch's FSDP2 cannot shard integer parameters")
    run(_int8_checkpoint_round_trip, str(tmp_path / "ckpt"), backend=backend)
