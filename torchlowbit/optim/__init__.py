"""Optimizers with 8-bit blockwise or 32-bit states, on the ``lowbit`` optimizer update ops.

``Paged*`` variants keep their states in CUDA managed memory (``lowbit::paged_empty``); on the CPU they are the
unpaged variants.
"""

from .adam import (
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
)  # fmt: skip
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .global_optim_manager import GlobalOptimManager
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .momentum import LARS, SGD, LARS8bit, LARS32bit, SGD8bit, SGD32bit
from .optimizer import Optimizer8bit
from .rmsprop import Adagrad, Adagrad8bit, Adagrad32bit, RMSprop, RMSprop8bit, RMSprop32bit

__all__ = [
    "LAMB", "LARS", "SGD", "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit",
    "Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit", "GlobalOptimManager", "LAMB8bit",
    "LAMB32bit", "LARS8bit", "LARS32bit", "Lion", "Lion8bit", "Lion32bit", "Optimizer8bit", "PagedAdEMAMix",
    "PagedAdEMAMix8bit", "PagedAdEMAMix32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit", "PagedAdamW",
    "PagedAdamW8bit", "PagedAdamW32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit", "RMSprop", "RMSprop8bit",
    "RMSprop32bit", "SGD8bit", "SGD32bit",
]  # fmt: skip
