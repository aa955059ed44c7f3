// The many-rows path of lowbit::gemm_4bit on Hopper (gemm_4bit_wgmma.cu), called by the op in gemm_4bit.cu.
#pragma once

#include "lowbit_common.h"

namespace lowbit {

// out2 (M, N) = A2 (M, K) @ dequantize(packed).T (+ bias) with a fused wgmma kernel: up to
// TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M rows (default 128) the cp.async one, from there up to
// TORCHLOWBIT_GEMM4BIT_WS_MAX_M (default 256) the warp-specialized one. False where neither applies (not an sm_90a
// build or device, float32 A, K % 64 != 0, blocksize < 64, more rows) or a grid whose waves keep fewer than 80% of the
// SMs busy (or fewer tiles than TORCHLOWBIT_GEMM4BIT_WGMMA_MIN_TILES where set), and the caller takes another path.
// The CTA size of the first kernel's 64-row tiles can be forced with TORCHLOWBIT_GEMM4BIT_WGMMA_WG (2 or 4).
bool gemm_4bit_wgmma(const at::Tensor& A2, const at::Tensor& packed, const at::Tensor& absmax, int log2_block,
                     int fp4, const at::Tensor* nested_absmax, const at::Tensor* nested_code,
                     const at::Tensor* nested_offset, int log2_nested, const at::Tensor* bias, int64_t N, int64_t K,
                     at::Tensor& out2);

}  // namespace lowbit
