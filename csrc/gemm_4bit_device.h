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

__device__ __forceinline__ float load_bias(const void* bias, int kind, int64_t i) {
  switch (kind) {
    case 1: return __ldg(static_cast<const float*>(bias) + i);
    case 2: return __half2float(static_cast<const __half*>(bias)[i]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[i]);
    default: return 0.0f;
  }
}

}  // namespace lowbit
