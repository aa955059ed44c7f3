// CUDA implementation of lowbit::int8_mixed_linear (LLM.int8), as torchlowbit/ops/int8_mixed_linear.py:
// vector-wise quantization of A with its outlier columns zeroed, the scaled int8 product with CB, and the
// outlier columns multiplied in float32 inside the same epilogue. Which columns are outliers stays on the
// device (an index and a count), so nothing synchronizes and the call can be captured in a CUDA graph.
#include "int8.h"

#include <torch/library.h>

namespace lowbit {
namespace {

void check(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB, const std::optional<at::Tensor>& bias,
           double threshold) {
  check_dtype(A, "A");
  check_dtype(CB, "CB", {at::kChar});
  check_dtype(SCB, "SCB", {at::kFloat});
  TORCH_CHECK_VALUE(CB.dim() == 2 && A.dim() > 0 && A.size(-1) == CB.size(1), "A must be (..., k) and CB (n, k), got A ",
                    shape_str(A.sizes()), " and CB ", shape_str(CB.sizes()));
  TORCH_CHECK_VALUE(SCB.dim() == 1 && SCB.size(0) == CB.size(0), "SCB must have shape (", num(CB.size(0)),
                    ",), one scale per row of CB, got ", shape_str(SCB.sizes()));
  if (bias) {
    check_dtype(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == CB.size(0), "bias must have shape (", num(CB.size(0)),
                      ",), got ", shape_str(bias->sizes()));
    check_same_device(A, "A", *bias, "bias");
  }
  TORCH_CHECK_VALUE(threshold >= 0, "threshold must be >= 0 (0 disables outlier decomposition), got ",
                    std::to_string(threshold));
  check_same_device(A, "A", CB, "CB");
  check_same_device(A, "A", SCB, "SCB");
}

std::tuple<at::Tensor, at::Tensor> int8_mixed_linear_cuda(const at::Tensor& A, const at::Tensor& CB,
                                                          const at::Tensor& SCB, const std::optional<at::Tensor>& bias,
                                                          double threshold) {
  check(A, CB, SCB, bias, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t k = A.size(-1), rows = leading_rows(A);
  const std::vector<int64_t> shape = product_shape(A, CB.size(0));
  const at::Tensor B = contiguous_aligned(CB, 16);

  if (threshold == 0 && int8_matmul_quantizes_rows(rows, k)) {
    const at::Tensor rows_of_A = contiguous_aligned(A.reshape({rows, k}), 16);
    const at::Tensor out = int8_scaled_matmul(rows_of_A, B, nullptr, SCB, bias, A.scalar_type(), nullptr);
    return {out.view(shape), at::zeros({k}, A.options().dtype(at::kBool))};
  }
  const auto [CA, SCA, outlier_cols] = int8_vectorwise_quant_cuda(A, threshold);
  std::optional<OutlierColumns> outliers;
  if (threshold > 0 && rows > 0) {
    const auto [index, count] = outlier_column_index(outlier_cols);
    outliers = OutlierColumns{A.reshape({rows, k}).contiguous(), index, count};
  }
  at::Tensor out = int8_scaled_matmul(CA.view({rows, k}), B, &SCA, SCB, bias, A.scalar_type(),
                                      outliers ? &*outliers : nullptr);
  return {out.view(shape), outlier_cols};
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("int8_mixed_linear", TORCH_FN(lowbit::int8_mixed_linear_cuda)); }
