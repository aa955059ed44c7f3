"""The ``lowbit::`` operator library: schemas, fake kernels, reference kernels, and the CUDA kernels.

Importing this package defines every ``torch.ops.lowbit.*`` op. CUDA tensors run the kernels of
``csrc/`` where the extension is built, and the reference kernels for any op it does not cover.
"""

# Each op module registers the fake and reference kernels of its ops (the schemas come in via registry).
from . import (  # noqa: F401
    gemm_4bit,
    int8_matmul,
    int8_mixed_linear,
    int8_vectorwise_quant,
    optimizer_update,
    paged_memory,
    quantize_4bit,
    quantize_blockwise,
    schemas,
)
from .cuda_extension import load as _load_cuda_extension
from .registry import fill_with_reference

CUDA_EXTENSION_LOADED, CUDA_EXTENSION_STATUS = _load_cuda_extension()
CUDA_REFERENCE_OPS = fill_with_reference("CUDA")
