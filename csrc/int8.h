// The pieces the int8 CUDA ops share across files: vector-wise quantization (int8_vectorwise_quant.cu),
// the scaled int8 matmul with its fused epilogue (int8_matmul.cu), composed by int8_mixed_linear.cu.
#pragma once

#include "lowbit_common.h"

#include <tuple>

namespace lowbit {

// lowbit::int8_vectorwise_quant: (int8 of A's shape, float32 row absmax, bool mask of outlier columns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold);

// The outlier columns of a mask, ascending, as (int32 index of k entries of which the first `count` are
// valid, int32 count of 1 element): computed on the device, so nothing waits for the host.
std::tuple<at::Tensor, at::Tensor> outlier_column_index(const at::Tensor& mask);

// LLM.int8's floating-point part: for every outlier column c, A[:, c] (the unquantized activations,
// (rows, k) contiguous in the output dtype) times the weight column B[:, c] * col_stats / 127.
struct OutlierColumns {
  at::Tensor A;
  at::Tensor index;
  at::Tensor count;
};

// (A @ B.T) * row_stats * col_stats / 127**2 (+ bias) (+ the outlier columns' product), rounded to dtype;
// A (rows, k) and B (n, k) int8, contiguous. Checks are the callers'.
at::Tensor int8_scaled_matmul(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                              const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                              at::ScalarType dtype, const OutlierColumns* outliers);

}  // namespace lowbit
