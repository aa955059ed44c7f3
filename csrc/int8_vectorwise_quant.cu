// CUDA kernels of lowbit::int8_vectorwise_quant, bit-identical to torchlowbit/ops/int8_vectorwise_quant.py:
// one CTA per row reads it once for the absmax (outliers left out, their columns flagged), then quantizes
// it from cache; a second kernel zeroes the flagged columns, touching only those.
#include "int8.h"

#include <torch/library.h>

namespace lowbit {
namespace {

constexpr int kZeroRows = 64;  // rows per CTA of the column-zeroing kernel

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    vectorwise_quant_kernel(const T* __restrict__ A, int64_t k, float threshold, int8_t* __restrict__ q,
                            float* __restrict__ row_stats, uint8_t* __restrict__ outlier_cols) {
  const int64_t row = blockIdx.x;
  const float absmax = quantize_row(A + row * k, k, threshold, q + row * k, outlier_cols);
  if (threadIdx.x == 0) row_stats[row] = absmax;
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
  const int64_t rows = leading_rows(A);
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kChar).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor row_stats = at::empty({rows}, A.options().dtype(at::kFloat));  // the kernel writes every row
  at::Tensor outlier_cols = at::zeros({k}, A.options().dtype(at::kBool));
  if (rows == 0 || k == 0) return {q, row_stats.zero_(), outlier_cols};

  const at::Tensor x = contiguous_aligned(A, 16);
  const cudaStream_t stream = current_stream();
  uint8_t* mask = reinterpret_cast<uint8_t*>(outlier_cols.data_ptr<bool>());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    vectorwise_quant_kernel<scalar_t><<<rows, kRowThreads, 0, stream>>>(
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
