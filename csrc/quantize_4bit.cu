// CUDA kernels of lowbit::quantize_4bit and lowbit::dequantize_4bit (NF4 / FP4, two codes a byte, the
// first element in the high nibble; the packed buffer padded with the code of 0.0), bit-identical to
// torchlowbit/ops/quantize_4bit.py.
#include "lowbit_quantize.h"
#include "packed_4bit.h"

#include <torch/library.h>

namespace lowbit {
namespace {

// ---------------------------------------------------------------------------------------------------
// dequantize_4bit: value = code[nibble] * absmax[block] in float32 (one rounding), then rounded to the
// output dtype. With double quantization absmax[block] = nested_code[q[block]] * nested_absmax[block /
// nested_blocksize] + nested_offset, each operation rounded separately (no FMA), as the reference does.
//
// A warp owns tiles of 1024 elements: 4 chunks of 256, each lane reading 4 packed bytes (8 elements,
// one quantization block since blocksize >= 32) and writing them with 16-byte stores.

constexpr int kDequantThreads = 256;
constexpr int kDequantTile = 1024;

template <bool NESTED>
__device__ __forceinline__ float block_absmax(int64_t block, const float* __restrict__ absmax,
                                              const uint8_t* __restrict__ absmax_q,
                                              const float* __restrict__ nested_absmax,
                                              const float* __restrict__ nested_code, float nested_offset,
                                              int log2_nested) {
  if constexpr (NESTED) {
    const float c = __ldg(nested_code + __ldg(absmax_q + block));
    const float s = __ldg(nested_absmax + (block >> log2_nested));
    return __fadd_rn(__fmul_rn(c, s), nested_offset);
  } else {
    return __ldg(absmax + block);
  }
}

template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, int64_t n, int log2_block, int fp4,
                           const float* __restrict__ absmax, const uint8_t* __restrict__ absmax_q,
                           const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
                           const float* __restrict__ nested_offset_ptr, int log2_nested, OutT* __restrict__ out,
                           int64_t ntiles) {
  const float nested_offset = NESTED ? __ldg(nested_offset_ptr) : 0.0f;
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = fp4 ? kFP4Code[threadIdx.x] : kNF4Code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kDequantThreads / 32);
  const int64_t packed_bytes = (n + 1) >> 1;
  for (int64_t tile = int64_t(blockIdx.x) * (kDequantThreads / 32) + (threadIdx.x >> 5); tile < ntiles;
       tile += warps) {
    const int64_t base = tile * kDequantTile + lane * 8;
    if (base + 3 * 256 + 8 <= n) {
      uint32_t w[4];
      float am[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) w[c] = __ldg(reinterpret_cast<const uint32_t*>(packed + ((base + 256 * c) >> 1)));
#pragma unroll
      for (int c = 0; c < 4; ++c)
        am[c] = block_absmax<NESTED>((base + 256 * c) >> log2_block, absmax, absmax_q, nested_absmax, nested_code,
                                     nested_offset, log2_nested);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (w[c] >> (8 * b)) & 0xffu;
          v[2 * b] = __fmul_rn(code[byte >> 4], am[c]);
          v[2 * b + 1] = __fmul_rn(code[byte & 15u], am[c]);
        }
        Elem<OutT>::store8(out + base + 256 * c, v);
      }
    } else {
#pragma unroll 1
      for (int c = 0; c < 4; ++c) {
        const int64_t e0 = base + 256 * c;
        if (e0 >= n) break;
        const float am = block_absmax<NESTED>(e0 >> log2_block, absmax, absmax_q, nested_absmax, nested_code,
                                              nested_offset, log2_nested);
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t byte_index = (e0 >> 1) + b;
          const uint32_t byte = byte_index < packed_bytes ? packed[byte_index] : 0u;
          v[2 * b] = __fmul_rn(code[byte >> 4], am);
          v[2 * b + 1] = __fmul_rn(code[byte & 15u], am);
        }
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

template <typename OutT, bool NESTED>
void launch_dequantize_4bit(const uint8_t* packed, int64_t n, int log2_block, int fp4, const float* absmax,
                            const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                            const float* nested_offset, int log2_nested, OutT* out) {
  const int64_t ntiles = ceil_div(n, kDequantTile);
  const int grid = persistent_grid<dequantize_4bit_kernel<OutT, NESTED>>(
      kDequantThreads, ceil_div(ntiles, kDequantThreads / 32));
  dequantize_4bit_kernel<OutT, NESTED><<<grid, kDequantThreads, 0, current_stream()>>>(
      packed, n, log2_block, fp4, absmax, absmax_q, nested_absmax, nested_code, nested_offset, log2_nested, out,
      ntiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type, at::ScalarType quant_storage) {
  check_dtype(A, "A");
  const int log2_block = log2_blocksize(blocksize);
  const int fp4 = parse_quant_type(quant_type);
  check_dtype_arg(quant_storage, "quant_storage", kStorageDtypes);
  const c10::cuda::CUDAGuard guard(A.device());

  const at::Tensor x = contiguous_aligned(A, 16);
  const int64_t n = x.numel();
  const int64_t itemsize = c10::elementSize(quant_storage);
  const int64_t count = packed_count(n, itemsize);
  at::Tensor packed = at::empty({count, 1}, A.options().dtype(quant_storage));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};

  uint8_t* out = reinterpret_cast<uint8_t*>(packed.data_ptr());
  float* am = absmax.data_ptr<float>();
  const int64_t out_bytes = count * itemsize;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (fp4) {
      launch_quantize<scalar_t, kFP4>(x.data_ptr<scalar_t>(), n, log2_block, out, out_bytes, am, nullptr, nullptr, 0);
    } else {
      launch_quantize<scalar_t, kNF4>(x.data_ptr<scalar_t>(), n, log2_block, out, out_bytes, am, nullptr, nullptr, 0);
    }
  });
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
  const Packed4bit layout = check_packed_4bit(A, "A", absmax, blocksize, quant_type, shape, nested_absmax,
                                              nested_code, nested_offset, nested_blocksize);
  const int64_t numel = layout.numel;
  const int log2_block = layout.log2_block, fp4 = layout.fp4, log2_nested = layout.log2_nested;
  const bool nested = layout.nested;
  check_dtype_arg(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(A.device());

  at::Tensor out = at::empty(shape, A.options().dtype(dtype));
  if (numel == 0) return out;

  const at::Tensor packed = contiguous_aligned(A, 4);
  const at::Tensor am = absmax.contiguous();
  at::Tensor nabs, ncode;
  if (nested) {
    nabs = nested_absmax->contiguous();
    ncode = nested_code->contiguous();
  }
  const float* offset = nested ? nested_offset->data_ptr<float>() : nullptr;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  const float* am_f = nested ? nullptr : am.data_ptr<float>();
  const uint8_t* am_q = nested ? am.data_ptr<uint8_t>() : nullptr;
  const float* nabs_p = nested ? nabs.data_ptr<float>() : nullptr;
  const float* ncode_p = nested ? ncode.data_ptr<float>() : nullptr;

  dispatch_float(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (nested) {
      launch_dequantize_4bit<scalar_t, true>(p, numel, log2_block, fp4, am_f, am_q, nabs_p, ncode_p, offset,
                                             log2_nested, out.data_ptr<scalar_t>());
    } else {
      launch_dequantize_4bit<scalar_t, false>(p, numel, log2_block, fp4, am_f, am_q, nabs_p, ncode_p, offset,
                                              log2_nested, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_4bit", TORCH_FN(lowbit::quantize_4bit_cuda));
  m.impl("dequantize_4bit", TORCH_FN(lowbit::dequantize_4bit_cuda));
}
