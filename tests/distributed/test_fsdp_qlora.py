"""QLoRA under FSDP2: a frozen NF4 base with LoRA adapters trained with AdamW8bit on 2 ranks equals one process."""

import copy

import pytest
import torch
import torch.distributed as dist
from launch import BACKENDS, run
from models import shard
from tiny_llama import TinyLlama, loss_fn
from torch.distributed.device_mesh import init_device_mesh

import torchlowbit as bnb

STEPS = 6
MIN_8BIT_SIZE = 1024  # the larger adapters get 8-bit states, the smaller 32-bit ones


def _optimizer(model: torch.nn.Module) -> bnb.optim.AdamW8bit:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bnb.optim.AdamW8bit(trainable, lr=1e-2, min_8bit_size=MIN_8BIT_SIZE)


def _train(model, tokens, steps: int, scale: float = 1.0) -> list[float]:
    optimizer, losses = _optimizer(model), []
    for step in range(steps):
        loss = loss_fn(model, tokens[step])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach() * scale)
    return losses, optimizer


def _qlora_matches_one_process(device, compiled: bool, ac: bool) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = TinyLlama(ac=ac).to(device)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 256, (STEPS, 4, 17), generator=torch.Generator().manual_seed(1)).to(device)
    expected, _ = _train(reference, tokens, STEPS)

    shard(model, model.blocks, init_device_mesh(device.type, (world,)), compiled)
    losses, optimizer = _train(model, tokens[:, rank::world], STEPS, 1 / world)
    for loss in losses:
        dist.all_reduce(loss)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]

    dtypes = set()
    for p, state in optimizer.state.items():  # shard-sized states, 8-bit by the global size
        assert state["state1"].to_local().numel() == p.to_local().numel()
        assert state["state1"].dtype == (torch.uint8 if p.numel() >= MIN_8BIT_SIZE else torch.float32)
        dtypes.add(state["state1"].dtype)
    assert dtypes == {torch.uint8, torch.float32}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
def test_qlora_matches_one_process(backend, compiled, ac):
    run(_qlora_matches_one_process, compiled, ac, backend=backend)
