// CUDA kernel of lowbit::gemm_4bit: out = A @ dequantize(B).T (+ bias) for a packed NF4/FP4 weight B of
// shape (N, K) = (out_features, in_features), A of shape (..., K) in fp16/bf16/fp32, output in A's dtype.
//
// Few rows of A (m <= fused_max_m(), default 32, fp16/bf16, K % 32 == 0): one fused kernel that streams the
// packed weight once and multiplies on the tensor cores (mma.sync m16n8k16, float32 accumulation).
//   - Weight rows are the MMA's M dimension, rows of A its N dimension (8 per n-tile, zero-padded; more than
//     32 rows run in launches of 32).
//   - The 16 code values, rounded to A's 16-bit type, make a byte table in shared memory: entry b holds
//     code[b >> 4] | code[b & 15] << 16, so one lookup per packed byte gives an A-fragment register (two
//     consecutive k); the table has one copy per lane, each in its own bank, so lookups never conflict.
//   - The dot product over k is order-free, so each thread takes consecutive bytes of its rows and the
//     activations at the same k (raw 32-bit words are B-fragment registers): a lane of quad t reads VEC bytes
//     at byte t * VEC of a 4 * VEC-byte "round", which lies inside one quantization block
//     (VEC = min(16, gcd(K, blocksize) / 8)); the MMAs of a round accumulate code * a into a temporary that is
//     scaled by the block's float32 absmax once per round.
//   - The (double-quantized) absmax of the CTA's rows is decoded once into shared memory at the start, as
//     the reference does it: nested_code[q] * nested_absmax[b / nested_blocksize] + offset, each operation
//     rounded in float32 (no FMA contraction).
//   - A CTA is 8 warps: WR warps along rows (32 rows each) times WK = 8 / WR warps along k (split-K, summed
//     through shared memory at the end). Bias is added in float32 before the final rounding.
//   - Precision: products of the code values rounded to A's dtype (relative error <= 2^-8 for bf16, 2^-11
//     for fp16: the output's own rounding) with A, accumulated in float32, times the exact float32 absmax.
// Larger m, fp32 A, K % 32 != 0 or an absmax table too large for shared memory: dequantize into A's dtype
// with lowbit::dequantize_4bit (the fast kernel of quantize_4bit.cu) and multiply with cuBLAS (at::mm/addmm).
// Tuning overrides (read once per process): TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M (rows up to which the fused
// kernel runs, in launches of 32) and TORCHLOWBIT_GEMM4BIT_WR (warps along rows of a CTA: 1, 2, 4, 8).
#include "lowbit_quantize.h"
#include "packed_4bit.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>

namespace lowbit {
namespace {

constexpr int kGemvThreads = 256;  // 8 warps
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kIterElems = 128;    // k elements per warp iteration: 4 lanes x 16 bytes x 2 codes
constexpr int kFusedMaxMDefault = 32;  // measured crossover with dequantize + cuBLAS: 32-64 rows
constexpr int64_t kMaxAbsmaxSmem = 160 * 1024;

struct GemvParams {
  const uint8_t* packed;  // (N, K / 2) bytes, 16-byte aligned rows
  const void* A;          // (m, K) contiguous, 16-byte aligned
  void* out;              // (m, ldo)
  int64_t ldo;
  int m;  // rows of A in this launch, <= 8 * NT
  int N;
  int K;
  int log2_block;
  int fp4;
  int nested;
  const float* absmax;        // float32 absmax (plain)
  const uint8_t* absmax_q;    // uint8 codes (nested)
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
  int log2_nested;
  const void* bias;
  int bias_kind;  // 0 none, 1 float32, 2 float16, 3 bfloat16
  int64_t nblocks;     // blocks of the whole weight
  int absmax_vec;       // the absmax buffer is 16-byte aligned (vector loads)
  int wr;               // warps along rows; 8 / wr along k
  int n_iter;           // ceil(K / 128)
};

template <typename T>
struct Mma;

template <>
struct Mma<at::BFloat16> {
  __device__ __forceinline__ static uint32_t bits(float x) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
  }
  __device__ __forceinline__ static void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<at::Half> {
  __device__ __forceinline__ static uint32_t bits(float x) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(x)));
  }
  __device__ __forceinline__ static void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// Streaming loads of the packed weight (read once: no L1 allocation).
__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
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

__device__ __forceinline__ float load_bias(const void* bias, int kind, int64_t i) {
  switch (kind) {
    case 1: return __ldg(static_cast<const float*>(bias) + i);
    case 2: return __half2float(static_cast<const __half*>(bias)[i]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[i]);
    default: return 0.0f;
  }
}

// Byte `b` of `x`, zero-extended (one PRMT).
__device__ __forceinline__ uint32_t byte_of(uint32_t x, int b) {
  return __byte_perm(x, 0u, 0x4440u | static_cast<uint32_t>(b));
}

__device__ __forceinline__ uint32_t lds32(uint32_t shared_address) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(shared_address));
  return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// NT: n-tiles of 8 rows of A; VEC: bytes per lane and round (4, 8 or 16); R: m16 tiles of weight rows per warp.
template <typename T, int NT, int VEC, int R>
__global__ void __launch_bounds__(kGemvThreads, NT == 1 ? 2 : 1) gemv_4bit_kernel(const GemvParams p) {
  constexpr int U = 16 / VEC;  // rounds per iteration
  constexpr int RW = 16 * R;   // weight rows per warp
  constexpr int RT = 2 * R;    // weight rows per thread
  constexpr bool kPrefetchA = NT <= 2;  // activations one iteration ahead (four n-tiles: no registers left)
  extern __shared__ float4 smem_dyn[];
  float* s_absmax = reinterpret_cast<float*>(smem_dyn);
  // Byte table: entry (b, lane) = code[b >> 4] | code[b & 15] << 16 in T, one copy per lane (its own bank), so
  // one lookup gives the A-fragment register of a packed byte (two consecutive k) without bank conflicts.
  __shared__ __align__(16) uint32_t s_tab[256 * 32];
  __shared__ float s_ncode[256];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wr_idx = warp % p.wr, wk_idx = warp / p.wr, wk = kGemvWarps / p.wr;
  const int rows_cta = RW * p.wr;
  const int64_t row0 = int64_t(blockIdx.x) * rows_cta;
  const int K = p.K, N = p.N, L = p.log2_block;
  const int64_t row_bytes = K >> 1;

  {
    const int b = threadIdx.x;  // 256 threads, one byte value each
    const float c_hi = p.fp4 ? kFP4Code[b >> 4] : kNF4Code[b >> 4];
    const float c_lo = p.fp4 ? kFP4Code[b & 15] : kNF4Code[b & 15];
    const uint32_t v = Mma<T>::bits(c_hi) | (Mma<T>::bits(c_lo) << 16);
    const uint4 v4 = make_uint4(v, v, v, v);
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // rotated so that a quarter warp's 16-byte stores hit different banks
      reinterpret_cast<uint4*>(s_tab + b * 32)[(q + b) & 7] = v4;
    }
  }
  const uint32_t tab_lane = static_cast<uint32_t>(__cvta_generic_to_shared(s_tab)) + 4 * lane;

  if (p.nested) s_ncode[threadIdx.x] = __ldg(p.nested_code + threadIdx.x);

  // The CTA's rows cover the consecutive blocks [b_begin, b_end) of the flattened weight: their absmax go to
  // a flat shared table, entry f at f + f / 32 (rows K / blocksize entries apart fall in different banks).
  const int64_t b_begin = (row0 * K) >> L;
  const int64_t b_end = ((min(row0 + rows_cta, int64_t(N)) * K - 1) >> L) + 1;

  // This thread's weight rows: i = 2 * tile + half -> local row 16 * tile + 8 * half + g. The block of
  // element (row, k) is tab_base + ((tab_off + k) >> L) in the table.
  const uint8_t* wrow[RT];
  int tab_base[RT], tab_off[RT];
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int lr = wr_idx * RW + 16 * (i >> 1) + 8 * (i & 1) + g;
    const int64_t r = min(row0 + lr, int64_t(N) - 1);
    wrow[i] = p.packed + r * row_bytes;
    tab_off[i] = static_cast<int>((r * K) & ((int64_t(1) << L) - 1));
    tab_base[i] = static_cast<int>(((r * K) >> L) - b_begin);
  }

  auto load_w = [&](int it, uint32_t (&w)[RT][4]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool valid = it * kIterElems + u * 8 * VEC < K;
      const int64_t off = int64_t(it) * (kIterElems / 2) + u * 4 * VEC + t * VEC;
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        if constexpr (VEC == 16) {
          const uint4 v = valid ? load_stream16(wrow[i] + off) : make_uint4(0, 0, 0, 0);
          w[i][0] = v.x, w[i][1] = v.y, w[i][2] = v.z, w[i][3] = v.w;
        } else if constexpr (VEC == 8) {
          const uint2 v = valid ? load_stream8(wrow[i] + off) : make_uint2(0, 0);
          w[i][2 * u] = v.x, w[i][2 * u + 1] = v.y;
        } else {
          w[i][u] = valid ? load_stream4(wrow[i] + off) : 0u;
        }
      }
    }
  };
  // The 64 bytes a quad reads from each row in iteration `it`, into L2 ahead of the loads.
  auto prefetch_w = [&](int it) {
    if (it < p.n_iter && it * kIterElems + 32 * t < K) {
#pragma unroll
      for (int i = 0; i < RT; ++i) prefetch_l2(wrow[i] + int64_t(it) * (kIterElems / 2) + 16 * t);
    }
  };

  // Activations: row 8 * j + g of A, the 2 * VEC elements of each round at this lane's bytes; word lb holds
  // the two elements of weight byte lb.
  const T* arow[NT];
  bool avalid[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = 8 * j + g;
    avalid[j] = n < p.m;
    arow[j] = static_cast<const T*>(p.A) + int64_t(avalid[j] ? n : 0) * K;
  }
  auto load_a = [&](int it, uint32_t (&x)[NT][16]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool valid = avalid[j] && it * kIterElems + u * 8 * VEC < K;
        const int64_t k = int64_t(it) * kIterElems + 2 * (u * 4 * VEC + t * VEC);
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
          const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(arow[j] + k) + q) : make_uint4(0, 0, 0, 0);
          const int w0 = u * VEC + 4 * q;
          x[j][w0] = v.x, x[j][w0 + 1] = v.y, x[j][w0 + 2] = v.z, x[j][w0 + 3] = v.w;
        }
      }
    }
  };

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.0f;

  int it = wk_idx;
  uint32_t wc[RT][4];
  uint32_t xc[NT][16];
  if (it < p.n_iter) {
    load_w(it, wc);
    if constexpr (kPrefetchA) load_a(it, xc);
  }
  prefetch_w(it + wk);
  prefetch_w(it + 2 * wk);

  // Decode the absmax of the CTA's blocks into shared memory: 16-byte vector loads (16 uint8 codes or 4
  // float32), a batch of them in flight together.
  __syncthreads();  // s_ncode
  {
    const float offset = p.nested ? __ldg(p.nested_offset) : 0.0f;
    const int E = static_cast<int>(b_end - b_begin);
    const int per = p.nested ? 16 : 4;  // entries per 16-byte chunk
    const int64_t c_begin = b_begin / per;
    const int nchunks = static_cast<int>((b_end + per - 1) / per - c_begin);
    const int64_t full_chunks = p.absmax_vec ? p.nblocks / per : 0;  // chunks that a vector load may read
    const uint4* src = static_cast<const uint4*>(p.nested ? static_cast<const void*>(p.absmax_q) : p.absmax);
    constexpr int kBatch = NT == 1 ? 2 : 4;  // NT == 1 keeps two CTAs an SM in 128 registers
    for (int c0 = 0; c0 < nchunks; c0 += kBatch * kGemvThreads) {
      uint4 v[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int64_t c = c_begin + c0 + q * kGemvThreads + threadIdx.x;
        v[q] = c0 + q * kGemvThreads + int(threadIdx.x) < nchunks && c < full_chunks ? __ldg(src + c)
                                                                                     : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int ci = c0 + q * kGemvThreads + threadIdx.x;
        if (ci >= nchunks) break;
        const int64_t c = c_begin + ci;
        const int f0 = static_cast<int>(c * per - b_begin);  // table entry of the chunk's first element
        if (c >= full_chunks) {  // the tensor's last partial chunk, or an unaligned buffer: element loads
          for (int e = 0; e < per; ++e) {
            const int f = f0 + e;
            if (f < 0 || f >= E) continue;
            const int64_t b = c * per + e;
            s_absmax[f + (f >> 5)] =
                p.nested ? __fadd_rn(__fmul_rn(s_ncode[__ldg(p.absmax_q + b)],
                                               __ldg(p.nested_absmax + (b >> p.log2_nested))),
                                     offset)
                         : __ldg(p.absmax + b);
          }
          continue;
        }
        const uint32_t words[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
        if (p.nested) {
          const float scale = __ldg(p.nested_absmax + ((c * 16) >> p.log2_nested));  // 16 | nested blocksize
#pragma unroll
          for (int e = 0; e < 16; ++e) {
            const int f = f0 + e;
            if (static_cast<unsigned>(f) < static_cast<unsigned>(E))
              s_absmax[f + (f >> 5)] = __fadd_rn(__fmul_rn(s_ncode[byte_of(words[e >> 2], e & 3)], scale), offset);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int f = f0 + e;
            if (static_cast<unsigned>(f) < static_cast<unsigned>(E)) s_absmax[f + (f >> 5)] = __uint_as_float(words[e]);
          }
        }
      }
    }
  }
  __syncthreads();

  for (; it < p.n_iter; it += wk) {
    const int next = it + wk;
    uint32_t wn[RT][4];
    uint32_t xn[NT][16];
    if (next < p.n_iter) {
      load_w(next, wn);
      if constexpr (kPrefetchA) load_a(next, xn);
    }
    prefetch_w(next + 2 * wk);
    if constexpr (!kPrefetchA) load_a(it, xc);

#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k0 = it * kIterElems + u * 8 * VEC;
      if (k0 >= K) break;  // the same for the whole warp
      float am[RT];
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const int f = tab_base[i] + ((tab_off[i] + k0) >> L);
        am[i] = s_absmax[f + (f >> 5)];
      }

      float tmp[R][NT][4];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) tmp[r][j][c] = 0.0f;

#pragma unroll
      for (int s = 0; s < VEC / 2; ++s) {
        const int lb = u * VEC + 2 * s;  // local bytes lb (k 2t, 2t + 1 of the MMA) and lb + 1 (k 2t + 8, 2t + 9)
        uint32_t a[RT][2];
#pragma unroll
        for (int i = 0; i < RT; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint32_t byte = byte_of(wc[i][(lb + e) >> 2], (lb + e) & 3);
            a[i][e] = lds32(tab_lane + (byte << 7));
          }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int r = 0; r < R; ++r)
            Mma<T>::mma(tmp[r][j], a[2 * r][0], a[2 * r + 1][0], a[2 * r][1], a[2 * r + 1][1], xc[j][lb], xc[j][lb + 1]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][j][c] = fmaf(tmp[r][j][c], am[2 * r + (c >> 1)], acc[r][j][c]);
    }

    if (next < p.n_iter) {
#pragma unroll
      for (int i = 0; i < RT; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) wc[i][q] = wn[i][q];
      if constexpr (kPrefetchA) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int q = 0; q < 16; ++q) xc[j][q] = xn[j][q];
      }
    }
  }

  // Split-K: sum the WK partial fragments of each row group through shared memory (reusing the table).
  constexpr int kFrag = R * NT * 4;
  if (wk > 1) {
    __syncthreads();
    float* red = s_absmax;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * kFrag + (r * NT + j) * 4 + c) * 32 + lane] = acc[r][j][c];
    __syncthreads();
    if (wk_idx != 0) return;
    for (int kk = 1; kk < wk; ++kk) {
      const int src = kk * p.wr + wr_idx;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][j][c] += red[(src * kFrag + (r * NT + j) * 4 + c) * 32 + lane];
    }
  }

  // Epilogue: c0, c1 are (row g, n 2t, 2t + 1), c2, c3 the same n at row g + 8.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + wr_idx * RW + 16 * r + 8 * h + g;
      if (row >= N) continue;
      const float bias = load_bias(p.bias, p.bias_kind, row);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = 8 * j + 2 * t + e;
          if (n < p.m) Elem<T>::store1(out + n * p.ldo + row, __fadd_rn(acc[r][j][2 * h + e], bias));
        }
      }
    }
  }
}

// Weight rows per warp (16 * R): two m16 tiles share each activation fragment.
template <int NT>
constexpr int rows_per_warp() {
  return 32;
}

template <typename T, int NT, int VEC>
void launch_gemv(const GemvParams& p, int grid, int64_t smem) {
  auto kernel = gemv_4bit_kernel<T, NT, VEC, rows_per_warp<NT>() / 16>;
  {  // static (33 KB byte table) + dynamic shared memory exceed the 48 KB default: raise the limit once per device
    static bool configured[64] = {false};
    const int device = c10::cuda::current_device();
    TORCH_INTERNAL_ASSERT(device < 64 && smem <= kMaxAbsmaxSmem);
    if (!configured[device]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kMaxAbsmaxSmem)));
      configured[device] = true;
    }
  }
  kernel<<<grid, kGemvThreads, smem, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT>
void launch_gemv_vec(const GemvParams& p, int vec, int grid, int64_t smem) {
  switch (vec) {
    case 16: launch_gemv<T, NT, 16>(p, grid, smem); break;
    case 8: launch_gemv<T, NT, 8>(p, grid, smem); break;
    default: launch_gemv<T, NT, 4>(p, grid, smem); break;
  }
}

int fused_max_m() {
  static const int value = [] {
    const char* env = std::getenv("TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M");
    return env != nullptr ? std::atoi(env) : kFusedMaxMDefault;
  }();
  return value;
}

// Tuning override of the warps along rows of a CTA (1, 2, 4 or 8; 0 or unset: the heuristic).
int forced_wr() {
  static const int value = [] {
    const char* env = std::getenv("TORCHLOWBIT_GEMM4BIT_WR");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return (v == 1 || v == 2 || v == 4 || v == 8) ? v : 0;
  }();
  return value;
}

int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// Shared-memory bytes of the absmax table of a CTA of `rows` rows of K elements.
int64_t absmax_table_bytes(int64_t rows, int64_t K, int log2_block) {
  const int64_t entries = ((rows * K) >> log2_block) + 2;
  return (entries + entries / 32 + 1) * 4;
}

// The fused path for all rows of A2 (M, K) into out2 (M, N); false where it does not apply.
bool gemv_fused(const at::Tensor& A2, const at::Tensor& packed, const at::Tensor& absmax, int log2_block, int fp4,
                const at::Tensor* nested_absmax, const at::Tensor* nested_code, const at::Tensor* nested_offset,
                int log2_nested, const at::Tensor* bias, int64_t N, int64_t K, at::Tensor& out2) {
  const int64_t M = A2.size(0);
  if (M > fused_max_m() || K % 32 != 0 || K <= 0 || K > (int64_t(1) << 30) || N >= (int64_t(1) << 31)) return false;
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) return false;
  const int64_t sms = multiprocessor_count();

  GemvParams p{};
  p.packed = static_cast<const uint8_t*>(packed.data_ptr());
  p.ldo = N;
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
  if (bias != nullptr) {
    p.bias = bias->data_ptr();
    p.bias_kind = bias->scalar_type() == at::kFloat ? 1 : bias->scalar_type() == at::kHalf ? 2 : 3;
  }
  p.nblocks = absmax.numel();
  p.absmax_vec = reinterpret_cast<uintptr_t>(absmax.data_ptr()) % 16 == 0;
  p.n_iter = static_cast<int>(ceil_div(K, kIterElems));
  const int64_t g = gcd64(K, int64_t(1) << log2_block);
  const int vec = static_cast<int>(std::min<int64_t>(16, g / 8));

  // Check that the table of a one-warp CTA (32 rows) fits before launching anything.
  if (absmax_table_bytes(32, K, log2_block) > kMaxAbsmaxSmem) return false;

  const int64_t elem = A2.element_size();
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const int m = static_cast<int>(std::min<int64_t>(32, M - m0));
    const int nt = m <= 8 ? 1 : m <= 16 ? 2 : 4;
    const int64_t rw = nt == 4 ? rows_per_warp<4>() : rows_per_warp<1>();
    // Few n-tiles are bound by the weight stream: small CTAs (one or two warps of rows) balance best; two
    // warps of rows once that still gives a CTA per SM (measured: 4096x14336 0.0246 ms against 0.0284 with
    // one, 4096x4096 0.0152 against 0.0113). Four n-tiles read 8x more activations per weight byte: more rows
    // share them, while still filling the SMs.
    int wr = nt <= 2 && ceil_div(N, rw * 2) >= sms ? 2 : 1;
    if (nt == 4) {
      for (int cand : {8, 4, 2}) {
        if (ceil_div(N, rw * cand) * 5 >= sms * 4) {
          wr = cand;
          break;
        }
      }
    }
    if (forced_wr() != 0) wr = forced_wr();
    while (wr > 1 && absmax_table_bytes(rw * wr, K, log2_block) > kMaxAbsmaxSmem) wr /= 2;
    p.wr = wr;
    p.m = m;
    p.A = static_cast<const char*>(A2.data_ptr()) + m0 * K * elem;
    p.out = static_cast<char*>(out2.data_ptr()) + m0 * N * elem;
    const int64_t table = absmax_table_bytes(rw * wr, K, log2_block);
    const int64_t red = (kGemvWarps / wr > 1) ? int64_t(kGemvThreads) * (rw / 16) * nt * 4 * 4 : 0;
    const int64_t smem = std::max(table, red);
    const int grid = static_cast<int>(ceil_div(N, rw * wr));
    dispatch_float(A2.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if constexpr (std::is_same_v<scalar_t, float>) {
        TORCH_INTERNAL_ASSERT(false, "gemv_fused: float32 A");
      } else {
        switch (nt) {
          case 1: launch_gemv_vec<scalar_t, 1>(p, vec, grid, smem); break;
          case 2: launch_gemv_vec<scalar_t, 2>(p, vec, grid, smem); break;
          default: launch_gemv_vec<scalar_t, 4>(p, vec, grid, smem); break;
        }
      }
    });
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------
// The op.

at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                          c10::string_view quant_type, c10::SymIntArrayRef sym_shape,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
  // Checks in the reference's order (torchlowbit/ops/gemm_4bit.py, quantize_4bit.check_packed).
  check_dtype(A, "A");
  const Packed4bit layout = check_packed_4bit(B, "B", absmax, blocksize, quant_type, shape, nested_absmax,
                                              nested_code, nested_offset, nested_blocksize);
  const int log2_block = layout.log2_block, fp4 = layout.fp4, log2_nested = layout.log2_nested;
  const bool nested = layout.nested;
  TORCH_CHECK_VALUE(shape.size() == 2, "shape must be the 2-d (out_features, in_features) of the weight, got ",
                    shape_str(shape));
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK_VALUE(A.dim() > 0 && A.size(-1) == K, "A must have shape (..., ", num(K),
                    ") to multiply a weight of shape ", shape_str(shape), ", got ", shape_str(A.sizes()));
  if (bias.has_value()) {
    check_dtype(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", num(N), ",), got ",
                      shape_str(bias->sizes()));
  }
  check_same_device(A, "A", B, "B");
  if (bias.has_value()) check_same_device(A, "A", *bias, "bias");
  const c10::cuda::CUDAGuard guard(A.device());

  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  out_shape.push_back(N);
  const at::ScalarType dtype = A.scalar_type();
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) M *= A.size(d);
  if (N == 0 || M == 0) return at::empty(out_shape, A.options());
  if (K == 0) {
    at::Tensor out = at::zeros(out_shape, A.options());
    if (bias.has_value()) out.add_(*bias);
    return out;
  }

  const at::Tensor A2 = contiguous_aligned(A.reshape({-1, K}), 16);
  if (dtype != at::kFloat) {
    const at::Tensor packed = contiguous_aligned(B, 16);
    const at::Tensor am = absmax.contiguous();
    at::Tensor nabs, ncode, noff, bias_c;
    if (nested) {
      nabs = nested_absmax->contiguous();
      ncode = nested_code->contiguous();
      noff = nested_offset->contiguous();
    }
    if (bias.has_value()) bias_c = bias->contiguous();
    at::Tensor out2 = at::empty({M, N}, A.options());
    if (gemv_fused(A2, packed, am, log2_block, fp4, nested ? &nabs : nullptr, nested ? &ncode : nullptr,
                   nested ? &noff : nullptr, log2_nested, bias.has_value() ? &bias_c : nullptr, N, K, out2)) {
      return out2.view(out_shape);
    }
  }

  // Dequantize into A's dtype, then cuBLAS.
  static auto dequantize = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lowbit::dequantize_4bit", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view,
                                                 c10::SymIntArrayRef, at::ScalarType, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                 int64_t)>();
  const at::Tensor W = dequantize.call(B, absmax, blocksize, quant_type, sym_shape, dtype, nested_absmax, nested_code,
                                       nested_offset, nested_blocksize);
  at::Tensor out2 = bias.has_value() ? at::addmm(bias->to(dtype), A2, W.t()) : at::mm(A2, W.t());
  return out2.view(out_shape);
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("gemm_4bit", TORCH_FN(lowbit::gemm_4bit_cuda)); }
