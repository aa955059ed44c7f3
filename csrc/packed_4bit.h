// The checks every op that reads a packed 4-bit weight makes (the reference's quantize_4bit.check_packed),
// and the layout they establish. Shared by dequantize_4bit and gemm_4bit.
#pragma once

#include "lowbit_common.h"

#include <optional>

namespace lowbit {

// Number of quant_storage elements (of `itemsize` bytes) that hold `numel` packed 4-bit codes.
inline int64_t packed_count(int64_t numel, int64_t itemsize) { return ceil_div(ceil_div(numel, 2), itemsize); }

struct Packed4bit {
  int64_t numel;    // elements of the weight the codes stand for
  int log2_block;   // log2 of the blocksize
  int fp4;          // 1 for fp4, 0 for nf4
  bool nested;      // the absmax is double-quantized
  int log2_nested;  // log2 of the nested blocksize (when nested)
};

inline Packed4bit check_packed_4bit(const at::Tensor& packed, const char* name, const at::Tensor& absmax,
                                    int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  check_dtype(packed, name, kStorageDtypes);
  Packed4bit layout{1, log2_blocksize(blocksize), parse_quant_type(quant_type), nested_absmax.has_value(), 0};
  for (const int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "shape must have non-negative sizes, got ", shape_str(shape));
    layout.numel *= s;
  }
  const int64_t itemsize = packed.element_size();
  const int64_t expected = packed_count(layout.numel, itemsize) * itemsize;
  TORCH_CHECK_VALUE(packed.numel() * itemsize == expected, name, " must hold ", num(expected),
                    " bytes of packed codes for shape ", shape_str(shape), ", got ", num(packed.numel() * itemsize));
  const int64_t nblocks = ceil_div(layout.numel, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, "absmax must have ", num(nblocks), " elements (one per block of ",
                    num(blocksize), "), got ", num(absmax.numel()));
  check_same_device(packed, name, absmax, "absmax");
  if (nested_absmax.has_value()) check_same_device(packed, name, *nested_absmax, "nested_absmax");
  if (nested_code.has_value()) check_same_device(packed, name, *nested_code, "nested_code");
  if (nested_offset.has_value()) check_same_device(packed, name, *nested_offset, "nested_offset");
  TORCH_CHECK_VALUE(nested_absmax.has_value() == nested_code.has_value() &&
                        nested_absmax.has_value() == nested_offset.has_value(),
                    "nested_absmax, nested_code and nested_offset must be given together (double quantization) "
                    "or not at all");
  if (!layout.nested) {
    check_dtype(absmax, "absmax", {at::kFloat});
    return layout;
  }
  check_dtype(absmax, "absmax", {at::kByte});
  check_dtype(*nested_absmax, "nested_absmax", {at::kFloat});
  check_code(*nested_code, "nested_code");
  check_dtype(*nested_offset, "nested_offset", {at::kFloat});
  check_numel(*nested_offset, "nested_offset", 1, "the mean subtracted before double quantization");
  layout.log2_nested = log2_blocksize(nested_blocksize, "nested_blocksize");
  const int64_t nested_blocks = ceil_div(absmax.numel(), nested_blocksize);
  TORCH_CHECK_VALUE(nested_absmax->numel() == nested_blocks, "nested_absmax must have ", num(nested_blocks),
                    " elements (one per block of ", num(nested_blocksize), " absmax codes), got ",
                    num(nested_absmax->numel()));
  return layout;
}

}  // namespace lowbit
