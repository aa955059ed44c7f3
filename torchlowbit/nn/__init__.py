"""Quantized modules and tensor-subclass parameters (Linear4bit, Linear8bitLt, ...)."""

from .int8params import Int8Params
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .linear8bitlt import Linear8bitLt
from .params4bit import Params4bit

__all__ = ["Int8Params", "Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "Params4bit"]
