"""Quantized modules and tensor-subclass parameters (Linear4bit, Linear8bitLt, embeddings)."""

from .embedding import Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding
from .int8params import Int8Params
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .linear8bitlt import Linear8bitLt
from .params4bit import Params4bit

__all__ = [
    "Embedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "Int8Params", "Linear4bit",
    "Linear8bitLt", "LinearFP4", "LinearNF4", "Params4bit", "StableEmbedding",
]  # fmt: skip
