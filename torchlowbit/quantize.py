"""``quantize_``: swap every ``nn.Linear`` of a model for its quantized counterpart, in place."""

import sys

import torch
from torch import nn

from .nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit

QUANT_TYPES = ("nf4", "fp4", "int8")
_PROGRESS_MIN_LAYERS = 64  # below this many layers no progress bar is drawn


def _skipped(name: str, skip_modules) -> bool:
    """``skip_modules`` entries match a full module name or any trailing part of it (e.g. ``"lm_head"``)."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip_modules)


def _quantized_linear(linear: nn.Linear, quant_type: str, compute_dtype, blocksize: int, compress_statistics: bool,
                      quant_storage: torch.dtype, threshold: float) -> nn.Module:  # fmt: skip
    """The quantized replacement of ``linear``, built on its device from its weights (or on meta, empty)."""
    has_bias = linear.bias is not None
    if quant_type == "int8":
        module = Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                              threshold=threshold, device="meta")  # fmt: skip
        module.weight = Int8Params(linear.weight.data, has_fp16_weights=False)
    else:
        module = Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype,
                            compress_statistics=compress_statistics, quant_type=quant_type,
                            quant_storage=quant_storage, device="meta")  # fmt: skip
        module.weight = Params4bit(linear.weight.data, blocksize=blocksize, compress_statistics=compress_statistics,
                                   quant_type=quant_type, quant_storage=quant_storage)  # fmt: skip
    if has_bias:
        module.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
    return module


def quantize_(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    compute_dtype: torch.dtype | None = None,
    skip_modules: tuple[str, ...] | list[str] = (),
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    threshold: float = 6.0,
    progress: bool | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by ``Linear4bit`` (``"nf4"``/``"fp4"``) or ``Linear8bitLt``
    (``"int8"``, LLM.int8 with outlier ``threshold``), quantizing each weight once on its own device.

    Layers on the meta device become empty quantized layers to fill with ``load_state_dict(..., assign=True)``.
    ``skip_modules`` names layers to keep (full names or trailing parts such as ``"lm_head"``). ``progress``
    draws a bar on stderr; by default only for models with many layers. Returns ``model``.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _skipped(name, skip_modules)
    ]
    if any(name == "" for name, _ in targets):
        raise ValueError("quantize_ replaces submodules: wrap a bare nn.Linear in a container first")
    show = len(targets) >= _PROGRESS_MIN_LAYERS if progress is None else progress
    for done, (name, linear) in enumerate(targets, 1):
        replacement = _quantized_linear(linear, quant_type, compute_dtype, blocksize, compress_statistics,
                                        quant_storage, threshold)  # fmt: skip
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, replacement)
        if show:
            _draw_progress(done, len(targets), name)
    if show and targets:
        sys.stderr.write("\n")
    return model


def _draw_progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\rquantize_ [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:60]:<60}")
    sys.stderr.flush()
