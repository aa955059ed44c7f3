// CUDA kernels of lowbit::int8_vectorwise_quant, bit-identical to torchlowbit/ops/int8_vectorwise_quant.py:
// one CTA per row reads it once for the absmax (outliers left out, their columns flagged), then quantizes
// it from cache; a second kernel zeroes the flagged columns, touching only those.
#include "int8.h"

#include <torch/library.h>

namespace lowbit {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kZeroRows = 64;  // rows per CTA of the column-zeroing kernel

// max that propagates NaN, as torch.amax does
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ float block_nan_max(float v) {
  __shared__ float partial[kQuantThreads / 32];
  __shared__ float result;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = partial[0];
    for (int w = 1; w < kQuantThreads / 32; ++w) m = nan_max(m, partial[w]);
    result = m;
  }
  __syncthreads();
  return result;
}

// Calls f(column, value) for every element of a row: 8 per 16-byte load when rows are 8-element aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t k, bool vectorized, const F& f) {
  if (vectorized) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < k; c += kQuantThreads * 8) {
      float v[8];
      Elem<T>::unpack8(Elem<T>::load8_raw(row + c), v);
#pragma unroll
      for (int j = 0; j < 8; ++j) f(c + j, v[j]);
    }
  } else {
    for (int64_t c = threadIdx.x; c < k; c += kQuantThreads) f(c, static_cast<float>(row[c]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    vectorwise_quant_kernel(const T* __restrict__ A, int64_t k, float threshold, int8_t* __restrict__ q,
                            float* __restrict__ row_stats, uint8_t* __restrict__ outlier_cols) {
  const T* row = A + int64_t(blockIdx.x) * k;
  int8_t* out = q + int64_t(blockIdx.x) * k;
  const bool vectorized = k % 8 == 0;
  const bool detect = threshold > 0.0f;

  float absmax = 0.0f;
  for_each_in_row(row, k, vectorized, [&](int64_t c, float x) {
    const float magnitude = fabsf(x);
    if (detect && magnitude >= threshold) {
      outlier_cols[c] = 1;  // every writer writes 1: no ordering needed
    } else {
      absmax = nan_max(absmax, magnitude);
    }
  });
  absmax = block_nan_max(absmax);
  if (threadIdx.x == 0) row_stats[blockIdx.x] = absmax;

  // the reference: round(x * (127 / absmax)) in float32, half to even; 0 for an all-zero row
  const float scale = absmax > 0.0f ? __fdiv_rn(127.0f, absmax) : 0.0f;
  auto quantize = [&](float x) -> int8_t {
    if (detect && fabsf(x) >= threshold) return 0;
    return static_cast<int8_t>(__float2int_rn(__fmul_rn(x, scale)));
  };
  if (vectorized) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < k; c += kQuantThreads * 8) {
      float v[8];
      Elem<T>::unpack8(Elem<T>::load8_raw(row + c), v);
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int j = 0; j < 8; ++j) packed[j / 4] |= uint32_t(uint8_t(quantize(v[j]))) << (8 * (j % 4));
      *reinterpret_cast<uint2*>(out + c) = make_uint2(packed[0], packed[1]);
    }
  } else {
    for (int64_t c = threadIdx.x; c < k; c += kQuantThreads) out[c] = quantize(static_cast<float>(row[c]));
  }
}

__global__ void __launch_bounds__(256) zero_outlier_columns_kernel(int8_t* __restrict__ q, int64_t rows, int64_t k,
                                                                   const uint8_t* __restrict__ outlier_cols) {
  const int64_t col = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (col >= k || !outlier_cols[col]) return;
  for (int64_t r0 = int64_t(blockIdx.y) * kZeroRows; r0 < rows; r0 += int64_t(gridDim.y) * kZeroRows) {
    const int64_t end = r0 + kZeroRows < rows ? r0 + kZeroRows : rows;
    for (int64_t r = r0; r < end; ++r) q[r * k + col] = 0;
  }
}

constexpr int kIndexThreads = 1024;

// One CTA: each thread counts the flags of its contiguous slice, a block scan gives its first slot.
__global__ void __launch_bounds__(kIndexThreads)
    outlier_index_kernel(const uint8_t* __restrict__ mask, int64_t k, int32_t* __restrict__ index,
                         int32_t* __restrict__ count) {
  __shared__ int32_t scan[kIndexThreads];
  const int64_t per_thread = (k + kIndexThreads - 1) / kIndexThreads;
  const int64_t begin = threadIdx.x * per_thread;
  const int64_t end = begin + per_thread < k ? begin + per_thread : k;
  int32_t local = 0;
  for (int64_t c = begin; c < end; ++c) local += mask[c] != 0;
  scan[threadIdx.x] = local;
  __syncthreads();
  for (int offset = 1; offset < kIndexThreads; offset <<= 1) {
    const int32_t add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  int32_t slot = scan[threadIdx.x] - local;
  for (int64_t c = begin; c < end; ++c)
    if (mask[c]) index[slot++] = static_cast<int32_t>(c);
  if (threadIdx.x == kIndexThreads - 1) *count = scan[kIndexThreads - 1];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold) {
  check_dtype(A, "A");
  TORCH_CHECK_VALUE(A.dim() > 0, "A must have at least one dimension (rows are all but the last)");
  TORCH_CHECK_VALUE(threshold >= 0, "threshold must be >= 0 (0 disables outlier detection), got ",
                    std::to_string(threshold));
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t k = A.size(-1);
  const int64_t rows = c10::multiply_integers(A.sizes().slice(0, A.dim() - 1));
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kChar).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor row_stats = at::zeros({rows}, A.options().dtype(at::kFloat));
  at::Tensor outlier_cols = at::zeros({k}, A.options().dtype(at::kBool));
  if (rows == 0 || k == 0) return {q, row_stats, outlier_cols};

  const at::Tensor x = contiguous_aligned(A, 16);
  const cudaStream_t stream = current_stream();
  uint8_t* mask = reinterpret_cast<uint8_t*>(outlier_cols.data_ptr<bool>());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    vectorwise_quant_kernel<scalar_t><<<rows, kQuantThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), k, static_cast<float>(threshold), q.data_ptr<int8_t>(), row_stats.data_ptr<float>(),
        mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (threshold > 0) {
    const dim3 grid(ceil_div(k, 256), std::min<int64_t>(ceil_div(rows, kZeroRows), 65535));
    zero_outlier_columns_kernel<<<grid, 256, 0, stream>>>(q.data_ptr<int8_t>(), rows, k, mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {q, row_stats, outlier_cols};
}

std::tuple<at::Tensor, at::Tensor> outlier_column_index(const at::Tensor& mask) {
  const int64_t k = mask.numel();
  at::Tensor index = at::empty({k}, mask.options().dtype(at::kInt));
  at::Tensor count = at::empty({1}, mask.options().dtype(at::kInt));
  outlier_index_kernel<<<1, kIndexThreads, 0, current_stream()>>>(
      reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), k, index.data_ptr<int32_t>(),
      count.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, count};
}

}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("int8_vectorwise_quant", TORCH_FN(lowbit::int8_vectorwise_quant_cuda)); }
