"""Optimizers with 8-bit blockwise and 32-bit states (the optimizer classes are not written yet)."""

from .global_optim_manager import GlobalOptimManager

__all__ = ["GlobalOptimManager"]
