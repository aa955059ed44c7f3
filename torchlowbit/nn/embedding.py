"""Embeddings: ``StableEmbedding`` and ``Embedding`` (float, 32-bit optimizer state), ``Embedding8bit`` and
``Embedding4bit``/``EmbeddingNF4``/``EmbeddingFP4`` (quantized, frozen, inference)."""

import torch
from torch import nn

from ..optim.global_optim_manager import GlobalOptimManager
from .int8params import Int8Params
from .params4bit import Params4bit


class Embedding(nn.Embedding):
    """``nn.Embedding`` with Xavier-uniform init whose optimizer state stays 32-bit (8-bit hurts embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
                         _weight, device=device, dtype=dtype)  # fmt: skip
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()


class StableEmbedding(Embedding):
    """``Embedding`` followed by a LayerNorm computed in the default float dtype, for stable training."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = nn.LayerNorm(self.embedding_dim, device=self.weight.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        embedded = super().forward(input).to(torch.get_default_dtype())
        return self.norm(embedded).to(self.weight.dtype)


class Embedding8bit(nn.Embedding):
    """An embedding table stored as row-wise int8 (``Int8Params``); rows are dequantized on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = Int8Params.checked(self.weight, f"{type(self).__name__}.weight")
        rows = nn.functional.embedding(input, weight.CB).float()
        scales = nn.functional.embedding(input, weight.SCB.view(-1, 1)) / 127.0
        return (rows * scales).to(self.dtype)


class Embedding4bit(nn.Embedding):
    """An embedding table stored as NF4/FP4 codes (``Params4bit``); rows are dequantized on lookup.

    When ``embedding_dim`` is a multiple of the blocksize each row owns whole blocks and only the looked-up
    rows are dequantized; otherwise the whole table is.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8, device=None) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=False,
                                 quant_type=quant_type, quant_storage=quant_storage)  # fmt: skip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = Params4bit.checked(self.weight, f"{type(self).__name__}.weight")
        dim, blocksize = self.embedding_dim, weight.blocksize
        if dim % blocksize or weight.compress_statistics:
            return nn.functional.embedding(input, weight.dequantize().to(self.dtype))
        packed_rows = weight.packed.contiguous().view(torch.uint8).view(self.num_embeddings, dim // 2)
        absmax_rows = weight.absmax.view(self.num_embeddings, dim // blocksize)
        packed = nn.functional.embedding(input.reshape(-1), packed_rows)
        absmax = nn.functional.embedding(input.reshape(-1), absmax_rows)
        rows = torch.ops.lowbit.dequantize_4bit(
            packed.reshape(-1, 1), absmax.reshape(-1), blocksize, weight.quant_type, [packed.shape[0], dim], self.dtype
        )
        return rows.view(*input.shape, dim)


class EmbeddingFP4(Embedding4bit):
    """``Embedding4bit`` with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, quant_storage=torch.uint8,
                 device=None) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device)


class EmbeddingNF4(Embedding4bit):
    """``Embedding4bit`` with ``quant_type="nf4"``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, quant_storage=torch.uint8,
                 device=None) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device)
