"""Facts and helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path).

The code tables are written out from DESIGN.md, independently of the library's own constants.
"""

import torch

# DESIGN.md, "Formats": NF4 (index = nibble value)
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
# DESIGN.md: FP4 raw magnitudes of codes 0..7, divided by 12; codes 8..15 are the negatives
FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4 = [m / 12 for m in FP4_MAGNITUDES] + [-m / 12 for m in FP4_MAGNITUDES]
CODES = {"nf4": NF4, "fp4": FP4}
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TRUE_FALSE = [True, False]


def id_formatter(label: str):
    return lambda value: f"{label}={value}"


def randn(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0) -> torch.Tensor:
    """A seeded normal tensor, drawn on the CPU so that every device sees the same values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a plain tensor (on the CPU), for exact comparisons across dtypes."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).clone() if t.dim() else t.reshape(1).view(torch.uint8).clone()


def state_bytes(module: torch.nn.Module) -> dict:
    return {k: (v.dtype, tuple(v.shape), raw_bytes(v)) for k, v in module.state_dict().items()}


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][:2] == after[key][:2], key
        assert torch.equal(before[key][2], after[key][2]), f"{key} changed"
