// The blockwise absmax quantization kernel shared by lowbit::quantize_4bit (NF4/FP4, two codes a byte)
// and lowbit::quantize_blockwise (8-bit, any 256-entry code, nearest or stochastic rounding).
//
// It reproduces torchlowbit/ops/blockwise.py bit for bit:
//   absmax  = max |x| over the block (any NaN gives NaN, written as 0x7fc00000), zeros beyond the end
//   inverse = absmax > 0 ? 1 / absmax : 0                   (float32, correctly rounded)
//   scaled  = x * inverse                                    (float32)
//   index   = #{ midpoints m : !(m >= scaled) }            (torch.bucketize(right=False); NaN -> last)
// where the midpoints are (v[i] + v[i+1]) / 2 in float32 of the code sorted ascending, and the code
// index is order[index] (the sort's permutation).
#pragma once

#include "lowbit_common.h"
#include "nearest_code8.h"

namespace lowbit {

// ---------------------------------------------------------------------------------------------------
// 4-bit codes. Values are the float32 roundings of the Python doubles (torchlowbit/codebooks.py).

static __constant__ float kNF4Code[16] = {
    (float)-1.0, (float)-0.6961928009986877, (float)-0.5250730514526367, (float)-0.39491748809814453,
    (float)-0.28444138169288635, (float)-0.18477343022823334, (float)-0.09105003625154495, (float)0.0,
    (float)0.07958029955625534, (float)0.16093020141124725, (float)0.24611230194568634,
    (float)0.33791524171829224, (float)0.44070982933044434, (float)0.5626170039176941,
    (float)0.7229568362236023, (float)1.0};

static __constant__ float kFP4Code[16] = {
    (float)(0.0 / 12), (float)(0.0625 / 12), (float)(8.0 / 12), (float)(12.0 / 12),
    (float)(4.0 / 12), (float)(6.0 / 12), (float)(2.0 / 12), (float)(3.0 / 12),
    (float)(-0.0 / 12), (float)(-0.0625 / 12), (float)(-8.0 / 12), (float)(-12.0 / 12),
    (float)(-4.0 / 12), (float)(-6.0 / 12), (float)(-2.0 / 12), (float)(-3.0 / 12)};

// FP4 magnitudes (codes 0..7) sorted ascending, and their code indices.
static __constant__ float kFP4SortedMagnitudes[8] = {
    (float)(0.0 / 12), (float)(0.0625 / 12), (float)(2.0 / 12), (float)(3.0 / 12),
    (float)(4.0 / 12), (float)(6.0 / 12), (float)(8.0 / 12), (float)(12.0 / 12)};
static __constant__ uint8_t kFP4SortedOrder[8] = {0, 1, 6, 7, 4, 5, 2, 3};

// Nearest 4-bit code through a table of 1/64-wide bins over the key: floor(key * 64) picks
// the bin exactly; each bin holds at most one midpoint (NF4 and FP4 midpoints are > 1/64 apart), so
// one comparison against it finishes the bucketize.
//   NF4: key = scaled,  bins k = -65..64 (130 entries)
//   FP4: key = |scaled|, bins k =   0..64 ( 65 entries), sign bit from scaled < 0
// A finite absmax with a finite inverse keeps |scaled| <= 1 + 2^-23, inside those bins. Otherwise
// (NaN/inf in the block, or a subnormal absmax whose inverse is inf) the key is clamped to [-1, 1]
// first (CLAMP): that keeps the result (no midpoint lies outside [-1, 1]) and sends NaN (fminf drops
// it) to the top bin, as bucketize does.
struct Entry4 {
  float mid;       // the midpoint inside the bin, +inf when none
  uint32_t codes;  // bytes: [lo, hi, lo << 4, hi << 4]; lo when key <= mid, hi when key > mid
};

template <bool FP4>
struct Table4Spec {
  static constexpr int kOffset = FP4 ? 0 : 65;
  static constexpr int kEntries = FP4 ? 65 : 130;
  static constexpr int kValues = FP4 ? 8 : 16;
};

template <bool FP4>
__device__ void build_table4(Entry4* table) {
  using S = Table4Spec<FP4>;
  for (int t = threadIdx.x; t < S::kEntries; t += blockDim.x) {
    const float lo_edge = static_cast<float>(t - S::kOffset) * 0.015625f;  // exact
    const float hi_edge = static_cast<float>(t - S::kOffset + 1) * 0.015625f;
    int below = 0;
    float mid_in_bin = __int_as_float(0x7f800000);  // +inf
    for (int j = 0; j + 1 < S::kValues; ++j) {
      const float a = FP4 ? kFP4SortedMagnitudes[j] : kNF4Code[j];
      const float b = FP4 ? kFP4SortedMagnitudes[j + 1] : kNF4Code[j + 1];
      const float m = __fdiv_rn(__fadd_rn(a, b), 2.0f);
      if (m < lo_edge) {
        ++below;
      } else if (m < hi_edge && mid_in_bin == __int_as_float(0x7f800000)) {
        mid_in_bin = m;
      }
    }
    const int above = below + (mid_in_bin != __int_as_float(0x7f800000) ? 1 : 0);
    const uint32_t lo = FP4 ? kFP4SortedOrder[below] : below;
    const uint32_t hi = FP4 ? kFP4SortedOrder[above] : above;
    Entry4 e;
    e.mid = mid_in_bin;
    e.codes = lo | (hi << 8) | (lo << 20) | (hi << 28);
    table[t] = e;
  }
}

// The shared-memory address to add 8 * (float bits of floor(key * 64) + 1.5 * 2^23) to for the entry of
// key's bin (32-bit shared addresses wrap, so the bias needs no bounds).
template <bool FP4>
__device__ __forceinline__ uint32_t table4_base(const Entry4* table) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(table)) +
         static_cast<uint32_t>(Table4Spec<FP4>::kOffset - 0x4b400000) * 8u;
}

// The code of one scaled value as a byte: in the high nibble (HIGH, the pair's first element) or low.
template <bool FP4, bool HIGH, bool CLAMP>
__device__ __forceinline__ uint32_t encode4(float scaled, uint32_t table_base) {
  float key = FP4 ? fabsf(scaled) : scaled;
  if (CLAMP) key = FP4 ? fminf(key, 1.0f) : fmaxf(fminf(key, 1.0f), -1.0f);
  // floor(key * 64) + 1.5 * 2^23, exactly, in the low mantissa bits.
  const float f = __fmaf_rd(key, 64.0f, 12582912.0f);
  uint32_t mid_bits, codes;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
               : "=r"(mid_bits), "=r"(codes)
               : "r"(table_base + (__float_as_uint(f) << 3)));
  const bool upper = !(__uint_as_float(mid_bits) >= key);
  uint32_t c = __byte_perm(codes, 0u, HIGH ? (upper ? 0x4443u : 0x4442u) : (upper ? 0x4441u : 0x4440u));
  if (FP4) c |= (scaled < 0.0f) ? (HIGH ? 0x80u : 0x08u) : 0u;
  return c;
}

// Four packed bytes of 8 scaled values, the first of each pair in the high nibble.
template <bool FP4, bool CLAMP>
__device__ __forceinline__ void encode8(const float (&s)[8], uint32_t table_base, uint32_t (&bytes)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    bytes[k] = encode4<FP4, true, CLAMP>(s[2 * k], table_base) | encode4<FP4, false, CLAMP>(s[2 * k + 1], table_base);
}

// ---------------------------------------------------------------------------------------------------
// 8-bit codes. Nearest rounding: each CTA builds the bin table of nearest_code8.h from the code. Stochastic
// rounding: the code sorted (stable, NaN last, like torch.sort) into search tables once per call by a one-CTA
// kernel. Any code is handled, and nothing needs a host synchronization.

struct Code8Shared {
  float q[256];  // the code
  int bad;       // build_table's scratch flag
  CodeTable table;
};

struct Tables8 {
  float value_tree[256];  // Eytzinger (level order, 1-based) tree of the 255 smallest sorted values
  float values[256];      // sorted values
  uint8_t order[256];     // code index of each sorted value
};

// #{ tree entries e : !(e >= x) } over a perfect Eytzinger tree of 255 sorted entries (0..255).
__device__ __forceinline__ int eytzinger_count_below(const float* tree, float x) {
  int n = 1;
#pragma unroll
  for (int level = 0; level < 8; ++level) n = 2 * n + (!(tree[n] >= x) ? 1 : 0);
  return n - 256;
}

// Philox4x32-10 (Salmon et al. 2011): four 32-bit random words of a 128-bit counter and 64-bit key.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// Uniform in [0, 1) with 24 random bits.
__device__ __forceinline__ float uniform01(uint32_t r) { return static_cast<float>(r >> 8) * 5.9604644775390625e-8f; }

// ---------------------------------------------------------------------------------------------------
// The kernel. Each thread owns 8 consecutive elements; a quantization block of B elements spans B/8
// threads (4..512) of one CTA; CTAs loop over tiles of 512 * 8 elements (persistent grid), loading the
// next tile while the current one is encoded.

enum QuantMode { kNF4 = 0, kFP4 = 1, kCode8 = 2, kCode8Stochastic = 3 };

constexpr int kQuantThreads = 512;
constexpr int kQuantTile = kQuantThreads * 8;

struct QuantArgs {
  int64_t n;
  int log2_block;
  uint8_t* out;
  int64_t out_bytes;
  float* absmax;
  int64_t nblocks;
  uint64_t seed;
};

template <int MODE>
struct QuantShared {
  uint32_t table4;  // table4_base
  const Tables8* t8;
  const CodeTable* code8;  // 8-bit nearest
  CodeTableParams tp8;
  uint32_t* partial;  // two sets of per-warp absmax partials, used by alternate tiles
};

// One tile of 8 elements per thread. FULL: all elements of the CTA's tile are < n (CTA-uniform). parity: the
// CTA's tiles alternate between the two partial sets, so that one barrier a tile orders their writes and reads.
template <typename T, int MODE, bool FULL>
__device__ __forceinline__ void quantize_tile(const typename Elem<T>::Raw8& raw, int64_t e0, const QuantArgs& a,
                                              const QuantShared<MODE>& sh, int parity) {
  constexpr bool k4bit = MODE == kNF4 || MODE == kFP4;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tpb = 1 << (a.log2_block - 3);  // threads per quantization block
  const int warps_per_block = tpb >> 5;     // 0 when a block fits in a warp

  // absmax: integer max of |x| bits over the block
  uint32_t key = Elem<T>::abs_key8(raw);
  if (tpb >= 32) {
    key = __reduce_max_sync(0xffffffffu, key);
  } else {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) key = max(key, __shfl_xor_sync(0xffffffffu, key, o & (tpb - 1)));
  }
  if (warps_per_block > 1) {
    uint32_t* partial = sh.partial + parity * (kQuantThreads / 32);
    if (lane == 0) partial[warp] = key;
    __syncthreads();
    // lane k reads warp k's partial (warps_per_block <= 16 lanes): one load and one reduction, not a loop
    const int first = warp & ~(warps_per_block - 1);
    key = __reduce_max_sync(0xffffffffu, lane < warps_per_block ? partial[first + lane] : 0u);
  }
  const float m = Elem<T>::key_to_float(key);
  if ((threadIdx.x & (tpb - 1)) == 0) {
    const int64_t block = e0 >> a.log2_block;
    if (FULL || block < a.nblocks) a.absmax[block] = m;
  }

  float v[8];
  Elem<T>::unpack8(raw, v);
  const float inverse = m > 0.0f ? __frcp_rn(m) : 0.0f;
  float s[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = __fmul_rn(v[j], inverse);

  if constexpr (k4bit) {
    constexpr bool fp4 = MODE == kFP4;
    uint32_t bytes[4];
    if (m <= 3.4028234663852886e38f && inverse <= 3.4028234663852886e38f) {
      encode8<fp4, false>(s, sh.table4, bytes);
    } else {
      encode8<fp4, true>(s, sh.table4, bytes);
    }
    if (!FULL) {  // padding holds the code of 0.0 (NF4: 7, FP4: 0), as the reference writes
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (e0 + 2 * k >= a.n) bytes[k] = (bytes[k] & 0x0fu) | (fp4 ? 0u : 0x70u);
        if (e0 + 2 * k + 1 >= a.n) bytes[k] = (bytes[k] & 0xf0u) | (fp4 ? 0u : 0x07u);
      }
    }
    const uint32_t word = __byte_perm(__byte_perm(bytes[0], bytes[1], 0x0040u), __byte_perm(bytes[2], bytes[3], 0x0040u),
                                      0x5410u);
    const int64_t ob = e0 >> 1;
    if (FULL || ob + 4 <= a.out_bytes) {
      *reinterpret_cast<uint32_t*>(a.out + ob) = word;
    } else {
#pragma unroll
      for (int b = 0; b < 4; ++b)
        if (ob + b < a.out_bytes) a.out[ob + b] = static_cast<uint8_t>(word >> (8 * b));
    }
  } else {
    uint32_t c[8];
    if constexpr (MODE == kCode8) {
      if (sh.tp8.fast) {
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = nearest_info<true>(s[j], *sh.code8, sh.tp8) & 0xffu;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = nearest_info<false>(s[j], *sh.code8, sh.tp8) & 0xffu;
      }
    } else {
      // One Philox counter per group of 8 elements: the stream depends on the seed and the element
      // index only, not on the launch configuration.
      const uint64_t group = static_cast<uint64_t>(e0) >> 3;
      const uint32_t k0 = static_cast<uint32_t>(a.seed), k1 = static_cast<uint32_t>(a.seed >> 32);
      const uint4 r0 = philox4x32_10(make_uint4(uint32_t(group), uint32_t(group >> 32), 0u, 0u), k0, k1);
      const uint4 r1 = philox4x32_10(make_uint4(uint32_t(group), uint32_t(group >> 32), 1u, 0u), k0, k1);
      const float u[8] = {uniform01(r0.x), uniform01(r0.y), uniform01(r0.z), uniform01(r0.w),
                          uniform01(r1.x), uniform01(r1.y), uniform01(r1.z), uniform01(r1.w)};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float xv = s[j];
        int upper = eytzinger_count_below(sh.t8->value_tree, xv);
        upper = upper < 1 ? 1 : (upper > 255 ? 255 : upper);
        const float low = sh.t8->values[upper - 1];
        const float high = sh.t8->values[upper];
        const float span = high > low ? __fsub_rn(high, low) : 1.0f;
        const bool take_upper = u[j] < __fdiv_rn(__fsub_rn(xv, low), span);
        c[j] = sh.t8->order[take_upper ? upper : upper - 1];
      }
    }
    const uint32_t lo = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
    const uint32_t hi = c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24);
    if (FULL) {
      *reinterpret_cast<uint2*>(a.out + e0) = make_uint2(lo, hi);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (e0 + j < a.n) a.out[e0 + j] = static_cast<uint8_t>(c[j]);
    }
  }
}

// CTAs per multiprocessor to fit (a register cap): full occupancy (32 registers) where that spills nothing.
template <typename T, int MODE>
constexpr int quantize_min_ctas() {
  return MODE == kCode8Stochastic ? 2 : (MODE == kCode8 && sizeof(T) == 2 ? 4 : 3);
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kQuantThreads, quantize_min_ctas<T, MODE>())
    quantize_kernel(const T* __restrict__ x, QuantArgs a, int64_t ntiles, const float* __restrict__ code8,
                    const Tables8* __restrict__ tables8) {
  constexpr bool k4bit = MODE == kNF4 || MODE == kFP4;
  constexpr size_t kTableBytes =
      k4bit ? sizeof(Entry4) * 130 : (MODE == kCode8 ? sizeof(Code8Shared) : sizeof(Tables8));
  __shared__ __align__(16) unsigned char tables[kTableBytes];
  __shared__ uint32_t partial[2 * (kQuantThreads / 32)];
  Entry4* table4 = reinterpret_cast<Entry4*>(tables);
  Tables8* t8 = reinterpret_cast<Tables8*>(tables);

  if constexpr (MODE == kNF4) build_table4<false>(table4);
  if constexpr (MODE == kFP4) build_table4<true>(table4);
  if constexpr (MODE == kCode8Stochastic) {
    const uint4* src = reinterpret_cast<const uint4*>(tables8);
    uint4* dst = reinterpret_cast<uint4*>(t8);
    for (int k = threadIdx.x; k < int(sizeof(Tables8) / 16); k += blockDim.x) dst[k] = src[k];
  }
  __syncthreads();

  QuantShared<MODE> sh;
  sh.table4 = table4_base<MODE == kFP4>(table4);
  sh.t8 = t8;
  sh.partial = partial;
  sh.code8 = nullptr;
  sh.tp8 = CodeTableParams{};
  if constexpr (MODE == kCode8) {
    Code8Shared& c8 = *reinterpret_cast<Code8Shared*>(tables);
    for (int k = threadIdx.x; k < 256; k += blockDim.x) c8.q[k] = code8[k];
    __syncthreads();
    sh.tp8 = build_table(c8.q, c8.table, &c8.bad, false);  // every thread; ends with a barrier
    sh.code8 = &c8.table;
  }

  using Raw8 = typename Elem<T>::Raw8;
  const int64_t full_tiles = a.n / kQuantTile;
  const T* xt = x + int64_t(threadIdx.x) * 8;
  int64_t tile = blockIdx.x;
  Raw8 next{};
  if (tile < full_tiles) next = Elem<T>::load8_raw(xt + tile * kQuantTile);
  for (int parity = 0; tile < ntiles; tile += gridDim.x, parity ^= 1) {
    const int64_t e0 = tile * kQuantTile + int64_t(threadIdx.x) * 8;
    if (tile < full_tiles) {
      const Raw8 cur = next;
      const int64_t following = tile + gridDim.x;
      if (following < full_tiles) next = Elem<T>::load8_raw(xt + following * kQuantTile);
      quantize_tile<T, MODE, true>(cur, e0, a, sh, parity);
    } else {
      const int64_t count = a.n - e0;
      Raw8 cur{};
      if (count > 0) cur = Elem<T>::load8_raw_partial(x + e0, count < 8 ? count : 8);
      quantize_tile<T, MODE, false>(cur, e0, a, sh, parity);
    }
  }
}

// Launch on the current stream. x: n contiguous 16-byte-aligned values; out: out_bytes output bytes
// (4-bit: the packed buffer, >= ceil(n / 2) bytes, padded with the code of 0.0; 8-bit: n codes);
// absmax: ceil(n / B) floats.
template <typename T, int MODE>
void launch_quantize(const T* x, int64_t n, int log2_block, uint8_t* out, int64_t out_bytes, float* absmax,
                     const float* code8, const Tables8* tables8, uint64_t seed) {
  QuantArgs a;
  a.n = n;
  a.log2_block = log2_block;
  a.out = out;
  a.out_bytes = out_bytes;
  a.absmax = absmax;
  a.nblocks = ceil_div(n, int64_t{1} << log2_block);
  a.seed = seed;
  const int64_t ntiles = ceil_div(n, kQuantTile);
  const int grid = persistent_grid<quantize_kernel<T, MODE>>(kQuantThreads, ntiles);
  quantize_kernel<T, MODE><<<grid, kQuantThreads, 0, current_stream()>>>(x, a, ntiles, code8, tables8);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lowbit
