"""Optimizers with 8-bit blockwise and 32-bit states."""
