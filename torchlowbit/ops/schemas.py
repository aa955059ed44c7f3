"""Every ``lowbit::`` operator schema, defined once.

Kernels live in the modules named after the ops (fake + reference implementations) and in ``csrc/``
(CUDA). Output shapes depend only on input shapes and arguments, never on data.
"""

import torch

LIBRARY = torch.library.Library("lowbit", "DEF")

# The double-quantized absmax of a 4-bit weight: uint8 codes into ``nested_code``, one float32 scale per
# ``nested_blocksize`` codes, plus ``nested_offset`` (a 1-element float32 tensor, so that reading it never
# synchronizes or specializes a graph). Decoded inside the ops that read 4-bit weights.
_NESTED = "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256"

# Scalars that schedules change every step are 0-d tensors, so compiled steps do not specialize on them.
_OPTIM_HYPER = (
    "float beta1, float beta2, float beta3, float alpha, float eps, float weight_decay, float gnorm_scale=1.0, "
    "float max_unorm=0.0, bool skip_zeros=False"
)
_OPTIM_SCALARS = f"Tensor lr, Tensor step, {_OPTIM_HYPER}"

SCHEMAS = {
    # 8-bit blockwise: (codes uint8 of A's shape, absmax float32 per block)
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize, int? seed=None) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    # 4-bit: (packed (bytes/itemsize, 1) in quant_storage, absmax float32 per block)
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        f"(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, {_NESTED})"
        " -> Tensor"
    ),
    # A @ dequantize(B).T (+ bias) for a packed (out, in) weight B of ``shape``; output in A's dtype
    "gemm_4bit": (
        "(Tensor A, Tensor B, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, Tensor? bias=None, "
        f"{_NESTED}) -> Tensor"
    ),
    # (int8 of A's shape, float32 row absmax, bool mask of outlier columns)
    "int8_vectorwise_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor)",
    "int8_linear_matmul": "(Tensor A, Tensor B) -> Tensor",
    "int8_mm_dequant": (
        "(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) -> Tensor"
    ),
    "int8_scaled_mm": (
        "(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, ScalarType? dtype=None) -> Tensor"
    ),
    # LLM.int8: A (float) times the int8 weight CB with row scales SCB, outlier columns in 16-bit;
    # returns (output in A's dtype, bool mask of outlier columns)
    "int8_mixed_linear": (
        "(Tensor A, Tensor CB, Tensor SCB, Tensor? bias=None, float threshold=0.0) -> (Tensor, Tensor)"
    ),
    "optimizer_update_32bit": (
        f"(str optimizer_name, Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!)? state2, {_OPTIM_SCALARS}) -> ()"
    ),
    "optimizer_update_8bit_blockwise": (
        "(str optimizer_name, Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!)? state2, "
        "Tensor(d!) absmax1, Tensor(e!)? absmax2, Tensor qmap1, Tensor? qmap2, "
        f"{_OPTIM_SCALARS}) -> ()"
    ),
    # The same steps over lists of parameters (one launch for many on CUDA). One step count per parameter, as
    # each keeps its own; state2 and absmax2 are empty lists for optimizers with one state.
    "optimizer_update_32bit_grouped": (
        "(str optimizer_name, Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor lr, "
        f"Tensor[] step, {_OPTIM_HYPER}) -> ()"
    ),
    "optimizer_update_8bit_blockwise_grouped": (
        "(str optimizer_name, Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] state1, Tensor(c!)[] state2, "
        "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor? qmap2, Tensor lr, Tensor[] step, "
        f"{_OPTIM_HYPER}) -> ()"
    ),
    # Paged optimizer states: an uninitialized tensor on ``like``'s device, in CUDA managed memory there
    # (the driver pages it to the host under memory pressure); and moving one to its device (or the host)
    # ahead of use, asynchronously on the current stream. On other devices: ordinary memory, a no-op.
    "paged_empty": "(Tensor like, int[] size, ScalarType dtype) -> Tensor",
    "prefetch_": "(Tensor(a!) t, bool to_device=True) -> ()",
}

for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)
