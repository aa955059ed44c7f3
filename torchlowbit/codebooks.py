"""Quantization code tables: the fixed 4-bit codes and the 8-bit map constructors.

The values are format facts shared with bitsandbytes checkpoints; every map is built in float32 the
way the original library builds it, so that the tables compare bit-exactly.
"""

import itertools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip

# Bit 3 is the sign; codes 0..7 hold magnitudes (2 exponent bits, 1 mantissa bit) scaled by 1/12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(m / 12 for m in _FP4_MAGNITUDES) + tuple(-m / 12 for m in _FP4_MAGNITUDES)

QUANT_TYPES = ("nf4", "fp4")


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 table of ``quant_type`` ('nf4' or 'fp4'), indexed by nibble value."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32, device=device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _pad_sort(values: list[float], total: int = 256) -> torch.Tensor:
    values = values + [0.0] * (total - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _bin_means(start: float, items: int) -> torch.Tensor:
    """Midpoints of ``items`` equal float32 bins over [start, 1]."""
    edges = torch.linspace(start, 1, items + 1, dtype=torch.float32)
    return (edges[:-1] + edges[1:]) / 2.0


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dynamic tree quantization map: each decade 10^-k holds a linear set of fraction values."""
    non_sign_bits = total_bits - 1
    sign_bit = 0 if signed else 1
    if max_exponent_bits > non_sign_bits + sign_bit:
        raise ValueError(
            f"max_exponent_bits ({max_exponent_bits}) must be at most the {non_sign_bits + sign_bit} non-sign bits "
            f"of total_bits={total_bits}{'' if signed else ' (unsigned)'}"
        )
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + sign_bit)
        data += _decade(_bin_means(0.1, items), i - (max_exponent_bits - 1), signed)
    if extra_items > 0:
        data += _decade(_bin_means(0.1, extra_items), 0, signed)
    data += [0.0, 1.0]
    if len(data) > 2**total_bits:
        raise ValueError(f"max_exponent_bits={max_exponent_bits} does not fit total_bits={total_bits}")
    return _pad_sort(data)


def _decade(means: torch.Tensor, exponent: int, signed: bool) -> list[float]:
    scaled = ((10**exponent) * means).tolist()
    return scaled + ((-(10**exponent)) * means).tolist() if signed else scaled


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat map: normal quantiles, 8 positive and 7 negative (NF4 when padded with zeros)."""
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1) (the largest quantile's probability), got {offset}")
    positives = 9 if use_extra_value else 8
    v1 = torch.special.ndtri(torch.linspace(offset, 0.5, positives)[:-1].double()).tolist()
    v3 = (-torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())).tolist()
    values = _pad_sort(v1 + v3)
    return values / values.max()


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """Evenly spaced values in [-1, 1] (or [0, 1]), zero-padded to 256 entries."""
    sign = -1.0 if signed else 0.0
    total_values = 2**total_bits
    if add_zero or total_bits < 8:
        # Drop one value so that zero is represented exactly.
        total_values = 2**total_bits if not signed else 2**total_bits - 1
    values = torch.linspace(sign, 1.0, total_values)
    gap = 256 - values.numel()
    if gap == 0:
        return values
    half = values.numel() // 2
    return torch.cat([values[:half], torch.zeros(gap), values[half:]])


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A minifloat map with ``exponent_bits`` exponent and ``precision_bits`` mantissa bits, normalized to max 1.

    As in the original library, the exponent of a normal value ``e`` is ``bias + 1 - e`` and subnormals
    scale by ``2**-bias``; the signed map holds both +0 and -0.
    """
    if exponent_bits + precision_bits != total_bits - int(signed):
        raise ValueError(
            f"exponent_bits + precision_bits must equal total_bits - {int(signed)} (the sign bit), "
            f"got {exponent_bits} + {precision_bits} with total_bits={total_bits}"
        )
    bias = 2 ** (exponent_bits - 1)
    values = []
    for evalue in range(2**exponent_bits):
        for bits in itertools.product((0, 1), repeat=precision_bits):
            mantissa = sum(bit * 2 ** -(j + 1) for j, bit in enumerate(bits))
            value = mantissa * 2**-bias if evalue == 0 else (1 + mantissa) * 2 ** -(evalue - bias - 1)
            values += [value, -value] if signed else [value]
    code = _pad_sort(values)
    return code / code.max()


def estimate_quantiles(
    A: torch.Tensor, out: torch.Tensor | None = None, offset: float = 1 / 512, num_quantiles: int = 256
) -> torch.Tensor:
    """``num_quantiles`` equally spaced quantiles of ``A`` (float32), from ``offset`` to ``1 - offset``.

    Exact order statistics: quantile ``t`` of 256 is the sorted value at ``round((offset + t * step) * (n - 1))``.
    With fewer quantiles the offset defaults to ``1 / (2 * num_quantiles)`` and a spread subset is kept.
    """
    if not 1 <= num_quantiles <= 256:
        raise ValueError(f"num_quantiles must be in [1, 256], got {num_quantiles}")
    if A.numel() == 0:
        raise ValueError("A must not be empty")
    if offset == 1 / 512 and num_quantiles < 256:
        offset = 1 / (2 * num_quantiles)
    positions = offset + torch.arange(256, dtype=torch.float64) * ((1 - 2 * offset) / 255)
    index = torch.round(positions * (A.numel() - 1)).long().to(A.device)
    result = A.detach().flatten().float().sort().values[index]
    if num_quantiles < 256:
        result = result[torch.linspace(0, 255, num_quantiles).long().to(A.device)]
    if out is not None:
        return out.copy_(result)
    return result
