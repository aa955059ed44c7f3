// The pieces the int8 CUDA ops share across files: vector-wise quantization (int8_vectorwise_quant.cu),
// the scaled int8 matmul with its fused epilogue (int8_matmul.cu), composed by int8_mixed_linear.cu.
#pragma once

#include "lowbit_common.h"

#include <tuple>
#include <vector>

namespace lowbit {

// ---------------------------------------------------------------------------------------------------
// Vector-wise quantization of one row by one CTA of kRowThreads threads (the quantization kernel's rows,
// and the activation rows the int8 GEMV quantizes itself).

constexpr int kRowThreads = 256;

// max that propagates NaN, as torch.amax does
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float block_nan_max(float v) {
  __shared__ float partial[kRowThreads / 32];
  __shared__ float result;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = partial[0];
    for (int w = 1; w < kRowThreads / 32; ++w) m = nan_max(m, partial[w]);
    result = m;
  }
  __syncthreads();
  return result;
}

// Calls f(column, value) for every element of a row: 8 per 16-byte load when rows are 8-element aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t k, const F& f) {
  if (k % 8 == 0) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < k; c += kRowThreads * 8) {
      float v[8];
      Elem<T>::unpack8(Elem<T>::load8_raw(row + c), v);
#pragma unroll
      for (int j = 0; j < 8; ++j) f(c + j, v[j]);
    }
  } else {
    for (int64_t c = threadIdx.x; c < k; c += kRowThreads) f(c, static_cast<float>(row[c]));
  }
}

// Quantizes a row as the reference does: round(x * (127 / absmax)) in float32, half to even, absmax over
// the non-outliers (|x| >= threshold when threshold > 0), outliers written as 0 and flagged in
// outlier_cols. The row is read twice, the second time from cache. Returns the row's absmax.
template <typename T>
__device__ float quantize_row(const T* __restrict__ row, int64_t k, float threshold, int8_t* __restrict__ out,
                              uint8_t* __restrict__ outlier_cols) {
  const bool detect = threshold > 0.0f;
  float absmax = 0.0f;
  for_each_in_row(row, k, [&](int64_t c, float x) {
    const float magnitude = fabsf(x);
    if (detect && magnitude >= threshold) {
      // Every writer writes 1, so no ordering is needed; most rows flag the same columns, and reading first keeps
      // them from all writing the same bytes (the writes to one address queue up in L2).
      if (outlier_cols[c] == 0) outlier_cols[c] = 1;
    } else {
      absmax = nan_max(absmax, magnitude);
    }
  });
  absmax = block_nan_max(absmax);
  const float scale = absmax > 0.0f ? __fdiv_rn(127.0f, absmax) : 0.0f;
  auto quantize = [&](float x) -> uint32_t {
    if (detect && fabsf(x) >= threshold) return 0u;
    return uint8_t(static_cast<int8_t>(__float2int_rn(__fmul_rn(x, scale))));
  };
  if (k % 8 == 0) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < k; c += kRowThreads * 8) {
      float v[8];
      Elem<T>::unpack8(Elem<T>::load8_raw(row + c), v);
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int j = 0; j < 8; ++j) packed[j / 4] |= quantize(v[j]) << (8 * (j % 4));
      *reinterpret_cast<uint2*>(out + c) = make_uint2(packed[0], packed[1]);
    }
  } else {
    for (int64_t c = threadIdx.x; c < k; c += kRowThreads) out[c] = static_cast<int8_t>(quantize(float(row[c])));
  }
  return absmax;
}

// ---------------------------------------------------------------------------------------------------
// The epilogue of the scaled int8 matmul (int8_matmul.cu, int8_matmul_wgmma.cu): an int32 product acc of row `row`
// and column `col` becomes ((acc * row_stats) * col_stats) / 127**2 (+ bias) in float32, plus LLM.int8's outlier
// columns, rounded once to the output dtype.

// The reference multiplies by the float64 1/127**2 rounded to float32.
constexpr float kInv127Squared = static_cast<float>(1.0 / (127.0 * 127.0));

struct EpilogueParams {
  int64_t rows, n, k;
  const float* row_stats;  // null for the int32 product
  const float* col_stats;
  const float* bias;  // float32 or null
  // outliers (count null when there are none): A (rows, k) in the output dtype, the columns, B (n, k)
  const void* outlier_A;
  const int32_t* outlier_index;
  const int32_t* outlier_count;
  const int8_t* B;
};

// From the column's scale and bias (the bias not read where e.bias is null).
__device__ __forceinline__ float scaled(const EpilogueParams& e, float row_stat, float col_stat, float bias,
                                       int32_t acc) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), row_stat), col_stat);
  v = __fmul_rn(v, kInv127Squared);
  return e.bias ? __fadd_rn(v, bias) : v;
}
__device__ __forceinline__ float scaled(const EpilogueParams& e, float row_stat, int64_t col, int32_t acc) {
  return scaled(e, row_stat, __ldg(e.col_stats + col), e.bias ? __ldg(e.bias + col) : 0.0f, acc);
}

// The dequantized weight value of an outlier column: B * (col_stats / 127), as the reference forms it.
__device__ __forceinline__ float outlier_weight(const EpilogueParams& e, int64_t col, int32_t column) {
  return __fmul_rn(static_cast<float>(e.B[col * e.k + column]), __fdiv_rn(__ldg(e.col_stats + col), 127.0f));
}

// The unquantized activation of an outlier column as float32: A (rows, k) of the output's float type.
template <typename OutT>
__device__ __forceinline__ float outlier_activation(const EpilogueParams& e, int64_t row, int32_t column) {
  return static_cast<float>(static_cast<const OutT*>(e.outlier_A)[row * e.k + column]);
}

// The scaled product of A (rows, k) and B (n, k), int8, 16-byte aligned rows, into out (rows, n) of dtype, with e's
// epilogue (row_stats set), in one Hopper kernel (int8_matmul_wgmma.cu); false where it does not apply (not an sm_90a
// build or device, k % 16 != 0, fewer rows than TORCHLOWBIT_INT8_WGMMA_MIN_M (default 64), 128 x 256 tiles for fewer
// than 40% of the SMs) and the caller takes another path.
bool int8_matmul_wgmma(const at::Tensor& A, const at::Tensor& B, void* out, at::ScalarType dtype,
                       const EpilogueParams& e);

// ---------------------------------------------------------------------------------------------------

// The rows of A (..., k): all but its last dimension.
inline int64_t leading_rows(const at::Tensor& A) { return c10::multiply_integers(A.sizes().slice(0, A.dim() - 1)); }

// The shape (..., n) of A (..., k) times a (n, k) weight.
inline std::vector<int64_t> product_shape(const at::Tensor& A, int64_t n) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end() - 1);
  shape.push_back(n);
  return shape;
}

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
// A (rows, k) and B (n, k) int8, contiguous. Without row_stats, A holds float rows (16-byte aligned, of
// dtype) that the GEMV quantizes itself at threshold 0 (int8_matmul_quantizes_rows must hold).
// Checks are the callers'.
at::Tensor int8_scaled_matmul(const at::Tensor& A, const at::Tensor& B, const at::Tensor* row_stats,
                              const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                              at::ScalarType dtype, const OutlierColumns* outliers);

// Whether int8_scaled_matmul can take float rows of A and quantize them inside its GEMV (no int8 copy of A).
bool int8_matmul_quantizes_rows(int64_t rows, int64_t k);

}  // namespace lowbit
