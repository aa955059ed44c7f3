"""Quantized modules and tensor-subclass parameters (Linear4bit, Linear8bitLt, ...)."""
