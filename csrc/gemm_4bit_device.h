// Device helpers shared by the two 4-bit matmul kernels (gemm_4bit.cu: few rows, gemm_4bit_wgmma.cu: many):
// streaming weight loads, byte-table addressing and the bias.
#pragma once

#include "lowbit_common.h"

namespace lowbit {

// Streaming loads of the packed weight (read once: no L1 allocation).
__device__ __forceinline__ uint2 load_stream8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_stream4(const uint8_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// Programmatic dependent launch (launch_kernel with overlap_previous): wait until the previous kernel of the stream
// has finished and its writes are visible; let the next kernel's CTAs start (they wait in turn before touching
// memory). Both are no-ops where the launch did not ask for it, and below sm_90.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Offset in a byte table of byte `b` of `w` in this lane's copy: entries 256 bytes apart, the lane's copy at
// `lane_offset` (< 256) inside each. One PRMT puts the byte above the lane offset, so a lookup is one PRMT and one
// LDS.
__device__ __forceinline__ uint32_t table_offset(uint32_t w, int b, uint32_t lane_offset) {
  return __byte_perm(w, lane_offset, 0x5504u | (static_cast<uint32_t>(b) << 4));
}

// Bias kinds: 0 none, 1 float32, 2 float16, 3 bfloat16.
inline int bias_kind(const at::Tensor* bias) {
  if (bias == nullptr) return 0;
  return bias->scalar_type() == at::kFloat ? 1 : bias->scalar_type() == at::kHalf ? 2 : 3;
}

// The weight's fields of a kernel's parameters (GemvParams, WgmmaParams: the same names).
template <typename Params>
void fill_weight(Params& p, const at::Tensor& packed, const at::Tensor& absmax, int log2_block, int fp4,
                 const at::Tensor* nested_absmax, const at::Tensor* nested_code, const at::Tensor* nested_offset,
                 int log2_nested, const at::Tensor* bias, int64_t N, int64_t K) {
  p.packed = static_cast<const uint8_t*>(packed.data_ptr());
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.log2_block = log2_block;
  p.fp4 = fp4;
  p.nested = nested_absmax != nullptr;
  if (p.nested) {
    p.absmax_q = absmax.data_ptr<uint8_t>();
    p.nested_absmax = nested_absmax->data_ptr<float>();
    p.nested_code = nested_code->data_ptr<float>();
    p.nested_offset = nested_offset->data_ptr<float>();
    p.log2_nested = log2_nested;
  } else {
    p.absmax = absmax.data_ptr<float>();
  }
  p.bias = bias != nullptr ? bias->data_ptr() : nullptr;
  p.bias_kind = bias_kind(bias);
}

__device__ __forceinline__ float load_bias(const void* bias, int kind, int64_t i) {
  switch (kind) {
    case 1: return __ldg(static_cast<const float*>(bias) + i);
    case 2: return __half2float(static_cast<const __half*>(bias)[i]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[i]);
    default: return 0.0f;
  }
}

}  // namespace lowbit
