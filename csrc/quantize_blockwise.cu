// CUDA kernels of lowbit::quantize_blockwise and lowbit::dequantize_blockwise (8-bit codes into a
// 256-entry code), bit-identical to torchlowbit/ops/quantize_blockwise.py without a seed.
//
// Any code is handled, with no host synchronization: nearest rounding through the bin table of
// nearest_code8.h, which every CTA builds from the code. Where the code has duplicate values the CPU
// reference's unstable sort may pick another index of an equal value: the dequantized values agree.
// With a seed, rounding is stochastic through Philox: each element takes one of the two neighbouring code
// values, the upper one with probability of its proximity (not the CPU's stream); a one-CTA kernel first sorts
// the code on the device (stable, NaN last, as torch.sort orders it) into search tables.
#include "lowbit_quantize.h"

#include <torch/library.h>

namespace lowbit {
namespace {

__global__ void __launch_bounds__(256) prepare_code8_kernel(const float* __restrict__ code,
                                                            Tables8* __restrict__ out) {
  __shared__ float c[256];
  __shared__ float sorted[256];
  const int i = threadIdx.x;
  c[i] = code[i];
  __syncthreads();
  const float v = c[i];
  const int rank = stable_rank(c, i);
  sorted[rank] = v;
  out->values[rank] = v;
  out->order[rank] = static_cast<uint8_t>(i);
  __syncthreads();
  if (i >= 1) {
    out->value_tree[i] = sorted[eytzinger_position(i)];
  } else {
    out->value_tree[0] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------------
// dequantize_blockwise: value = code[q] * absmax[block] in float32, rounded to the output dtype. A warp
// owns tiles of 1024 elements: 4 chunks of 256, each lane reading 8 codes (one quantization block).

constexpr int kDequantThreads = 256;
constexpr int kDequantTile = 1024;

template <typename OutT>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ q, int64_t n, int log2_block,
                                const float* __restrict__ absmax, const float* __restrict__ code_g,
                                OutT* __restrict__ out, int64_t ntiles) {
  __shared__ float code[256];
  for (int k = threadIdx.x; k < 256; k += kDequantThreads) code[k] = code_g[k];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kDequantThreads / 32);
  for (int64_t tile = int64_t(blockIdx.x) * (kDequantThreads / 32) + (threadIdx.x >> 5); tile < ntiles;
       tile += warps) {
    const int64_t base = tile * kDequantTile + lane * 8;
    if (base + 3 * 256 + 8 <= n) {
      uint2 w[4];
      float am[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) w[c] = __ldg(reinterpret_cast<const uint2*>(q + base + 256 * c));
#pragma unroll
      for (int c = 0; c < 4; ++c) am[c] = __ldg(absmax + ((base + 256 * c) >> log2_block));
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const uint32_t byte = ((b < 4 ? w[c].x : w[c].y) >> (8 * (b & 3))) & 0xffu;
          v[b] = __fmul_rn(code[byte], am[c]);
        }
        Elem<OutT>::store8(out + base + 256 * c, v);
      }
    } else {
#pragma unroll 1
      for (int c = 0; c < 4; ++c) {
        const int64_t e0 = base + 256 * c;
        if (e0 >= n) break;
        const float am = __ldg(absmax + (e0 >> log2_block));
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = e0 + b < n ? __fmul_rn(code[q[e0 + b]], am) : 0.0f;
        if (e0 + 8 <= n) {
          Elem<OutT>::store8(out + e0, v);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (e0 + j < n) Elem<OutT>::store1(out + e0 + j, v[j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize, std::optional<int64_t> seed) {
  check_dtype(A, "A");
  check_code(code);
  const int log2_block = log2_blocksize(blocksize);
  check_same_device(A, "A", code, "code");
  const c10::cuda::CUDAGuard guard(A.device());

  const at::Tensor x = contiguous_aligned(A, 16);
  const int64_t n = x.numel();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  if (n == 0) return {out, absmax};

  const at::Tensor code_c = code.contiguous();
  const float* code_ptr = code_c.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::Tensor tables;
  if (seed.has_value()) {
    tables = at::empty({static_cast<int64_t>(sizeof(Tables8))}, A.options().dtype(at::kByte));
    prepare_code8_kernel<<<1, 256, 0, current_stream()>>>(code_ptr, reinterpret_cast<Tables8*>(tables.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (seed.has_value()) {
      launch_quantize<scalar_t, kCode8Stochastic>(x.data_ptr<scalar_t>(), n, log2_block, o, n, am, nullptr,
                                                  reinterpret_cast<const Tables8*>(tables.data_ptr()),
                                                  static_cast<uint64_t>(*seed));
    } else {
      launch_quantize<scalar_t, kCode8>(x.data_ptr<scalar_t>(), n, log2_block, o, n, am, code_ptr, nullptr, 0);
    }
  });
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  check_dtype(A, "A", {at::kByte});
  check_dtype(absmax, "absmax", {at::kFloat});
  check_code(code);
  const int log2_block = log2_blocksize(blocksize);
  const int64_t n = A.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, "absmax must have ", num(nblocks), " elements (one per block of ",
                    num(blocksize), "), got ", num(absmax.numel()));
  check_same_device(A, "A", absmax, "absmax");
  check_same_device(A, "A", code, "code");
  check_dtype_arg(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(A.device());

  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return out;
  const at::Tensor q = contiguous_aligned(A, 8);
  const at::Tensor am = absmax.contiguous();
  const at::Tensor code_c = code.contiguous();
  const int64_t ntiles = ceil_div(n, kDequantTile);
  dispatch_float(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const int grid = persistent_grid<dequantize_blockwise_kernel<scalar_t>>(
        kDequantThreads, ceil_div(ntiles, kDequantThreads / 32));
    dequantize_blockwise_kernel<scalar_t><<<grid, kDequantThreads, 0, current_stream()>>>(
        q.data_ptr<uint8_t>(), n, log2_block, am.data_ptr<float>(), code_c.data_ptr<float>(),
        out.data_ptr<scalar_t>(), ntiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_blockwise", TORCH_FN(lowbit::quantize_blockwise_cuda));
  m.impl("dequantize_blockwise", TORCH_FN(lowbit::dequantize_blockwise_cuda));
}
