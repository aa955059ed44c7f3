"""Row sharding of quantized weights (the ops FSDP2 applies to them) and the all-gather extension, in one process."""

import pytest
import torch
from helpers import TRUE_FALSE, randn

import torchlowbit as bnb

STORAGE = [torch.uint8, torch.bfloat16, torch.float32]


class _Mesh:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _weight4bit(device, storage=torch.uint8, nested=True):
    data = randn((128, 64), device=device, seed=3)
    return bnb.nn.Params4bit(data, quant_type="nf4", compress_statistics=nested, quant_storage=storage)


def _all_gather(weight, world: int):
    """What FSDP2 does around one weight: shard, pre-all-gather on every rank, concatenate, post-all-gather."""
    shards = torch.chunk(weight, world)
    pre = [s.fsdp_pre_all_gather(_Mesh(world), weight.shape, weight.stride(), None, None) for s in shards]
    outputs = [torch.cat([inputs[i].reshape(-1) for inputs, _ in pre]) for i in range(len(pre[0][0]))]
    outputs = [out.view(-1, *inp.shape[1:]) for out, inp in zip(outputs, pre[0][0], strict=True)]
    return shards, shards[0].fsdp_post_all_gather(tuple(outputs), pre[0][1], torch.bfloat16)[0]


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("nested", TRUE_FALSE)
def test_4bit_shards_carry_their_blocks_and_gather_back(device, storage, nested):
    weight = _weight4bit(device, storage, nested)
    shards, gathered = _all_gather(weight, 2)
    per_entry = weight._rows_per_entry()["absmax"]
    rows = weight.shape[0] // 2
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.packed, weight.packed[rank * rows : (rank + 1) * rows])
        assert torch.equal(shard.absmax, weight.absmax[rank * rows // per_entry : (rank + 1) * rows // per_entry])
        if nested:
            assert shard.nested_absmax is weight.nested_absmax  # second-level scales are whole on every rank
    assert type(gathered) is bnb.nn.Params4bit and gathered.meta == weight.meta
    assert all(torch.equal(gathered.inner()[k], v) for k, v in weight.inner().items() if v is not None)
    assert torch.equal(gathered.dequantize(), weight.dequantize())


def test_one_rank_mesh_gathers_one_concatenated_input(device):
    weight = _weight4bit(device)
    inputs, metadata = weight.fsdp_pre_all_gather(_Mesh(1), weight.shape, weight.stride(), None, None)
    assert len(inputs) == 1 and inputs[0].dtype == torch.uint8
    gathered, _ = weight.fsdp_post_all_gather(inputs, metadata, torch.bfloat16)
    assert torch.equal(gathered.dequantize(), weight.dequantize())


def test_int8_shards_carry_their_row_scales(device):
    weight = bnb.nn.Int8Params(randn((48, 64), device=device, seed=4), has_fp16_weights=False)
    shards, gathered = _all_gather(weight, 3)
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.CB, weight.CB[rank * 16 : (rank + 1) * 16])
        assert torch.equal(shard.SCB, weight.SCB[rank * 16 : (rank + 1) * 16])
        assert torch.equal(shard.dequantize(), weight.dequantize()[rank * 16 : (rank + 1) * 16])
    assert torch.equal(gathered.dequantize(), weight.dequantize())


def test_padding_copy_and_views_keep_the_layout(device):
    weight = _weight4bit(device, torch.bfloat16)
    shard = torch.chunk(weight, 2)[1]
    padded = weight.new_zeros(shard.shape)
    padded.narrow(0, 0, shard.shape[0]).copy_(shard)
    assert torch.equal(padded.packed, shard.packed) and torch.equal(padded.absmax, shard.absmax)
    assert padded.view(-1).shape == (shard.shape[0],)
    assert torch.as_strided(padded, padded.shape, padded.stride()).packed is not None


def test_cuts_through_blocks_and_other_misuse_raise(device):
    weight = _weight4bit(device)  # 4096 rows of uint8 codes, 32 rows per block
    with pytest.raises(ValueError, match=r"world sizes that work: \[1, 2, 4, 8, 16, 32, 64\]"):
        torch.split(weight, 16)
    with pytest.raises(ValueError, match="world sizes that work"):
        torch.chunk(weight, 3)
    with pytest.raises(ValueError, match="dim 0"):
        torch.split(weight, 1, dim=1)
    with pytest.raises(ValueError, match="step 1"):
        weight[::2]
    with pytest.raises(ValueError, match="its own dtype"):
        weight.new_zeros(weight.shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="alias"):
        torch.as_strided(weight, (10, 1), (1, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        weight[:64].copy_(weight[64:160])
    with pytest.raises(ValueError, match="world sizes that work"):
        weight.fsdp_pre_all_gather(_Mesh(3), weight.shape, weight.stride(), None, None)
