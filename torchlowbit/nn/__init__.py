"""Quantized modules and tensor-subclass parameters (Linear4bit, Linear8bitLt, ...)."""

from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .params4bit import Params4bit

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]
