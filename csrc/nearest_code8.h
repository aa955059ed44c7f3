// The nearest entry of a 256-entry code (8-bit blockwise states and quantize_blockwise), as
// torchlowbit/ops/blockwise.py `nearest` finds it: the index of bucketize(x, float32 midpoints of the code
// sorted ascending) (ties to the lower entry, NaN to the top), through the sort's permutation.
//
// The search is one shared-memory table lookup: the bits of |x| select a bin (2^M bins per octave over
// [2^-24, 2), one bin below and one above, one table per sign) holding at most one distinct midpoint, so one
// comparison finishes it. A CTA builds the table from the code (any code; an unsorted one is sorted first,
// stably, NaN last, as torch.sort orders it); a code that no table fits (e.g. the fp8 map) takes a branch-free
// Eytzinger search over the 255 midpoints instead.
#pragma once

#include <cstdint>

namespace lowbit {

constexpr int kTableCap = 3204;  // 2 * (25 * 64 + 2): M = 6 with both signs; M = 7 positive-only fits too

// Table configurations, in order of preference (smaller tables first): (M, positive-only).
constexpr int kNumConfigs = 7;
static __constant__ int kConfigM[kNumConfigs] = {4, 5, 6, 4, 5, 6, 7};
static __constant__ int kConfigPos[kNumConfigs] = {0, 0, 0, 1, 1, 1, 1};
constexpr int kPositiveOnlyMask = 0x78;

struct CodeTable {
  uint2 entry[kTableCap];  // (midpoint bits or +inf, info(lo) | info(hi) << 16)
  float mids[256];         // the 255 sorted midpoints
  float tree[256];         // the midpoints as an Eytzinger tree (1-based), the fallback search
  uint16_t info[256];      // per sorted position: code index | signbit(code value) << 8
};

struct CodeTableParams {
  uint32_t shift;    // 23 - M
  int bias;          // (103 << M) - 1: bin 1 starts at 2^-24
  int nb;            // bins per sign: 25 octaves * 2^M + 2
  uint32_t negmask;  // 0 for a positive-only table (every negative x is below every midpoint)
  int fast;          // the table fits; else the tree
};

// In-order position of Eytzinger node n (1..255) of a perfect tree of 255 nodes.
__device__ __forceinline__ int eytzinger_position(int n) {
  const int level = 31 - __clz(n);
  return ((2 * (n - (1 << level)) + 1) << (7 - level)) - 1;
}

__device__ __forceinline__ int bin_of(uint32_t mag, uint32_t shift, int bias, int nb) {
  int b = int(mag >> shift) - bias;
  return min(max(b, 0), nb - 1);
}

// The table slot whose answer depends on whether midpoint m < x (-1: none; m is constant for its bins).
__device__ inline int inside_id(float m, int M) {
  const uint32_t shift = 23 - M;
  const int bias = (103 << M) - 1, nb = (25 << M) + 2;
  const uint32_t mag = __float_as_uint(m) & 0x7fffffffu;
  const int b = bin_of(mag, shift, bias, nb);
  if (!(m < 0.0f)) return b;                                      // x >= 0 side: bin [lo, hi) holds lo <= m < hi
  if (b > 0 && mag == (uint32_t(b + bias) << shift)) return -1;   // x < 0 side: -hi < m < -lo strictly
  return nb + b;
}

// The position of q[i] among the 256 entries of q sorted as torch.sort sorts them: stable, NaN last.
__device__ __forceinline__ int stable_rank(const float* q, int i) {
  const float v = q[i];
  const bool v_nan = v != v;
  int rank = 0;
  for (int j = 0; j < 256; ++j) {
    const float w = q[j];
    const bool w_nan = w != w;
    const bool w_before = (w < v) || (!w_nan && v_nan);
    const bool v_before = (v < w) || (!v_nan && w_nan);
    rank += (w_before || (!v_before && j < i)) ? 1 : 0;
  }
  return rank;
}

// #{ i < 255 : mids[i] < v } (LEQ: <=) over the sorted midpoints.
template <bool LEQ>
__device__ __forceinline__ int count_below(const float* mids, float v) {
  int pos = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) {
    const int probe = pos + step - 1;
    if (probe < 255 && (LEQ ? mids[probe] <= v : mids[probe] < v)) pos += step;
  }
  return pos;
}

// Builds the search structures of one 256-entry map (already in shared memory). All threads call; ends
// with a barrier. Returns the table parameters (the same in every thread).
__device__ inline CodeTableParams build_table(const float* q, CodeTable& t, int* bad_flag, bool force_tree) {
  const int i = threadIdx.x;
  float* sorted = t.tree;  // scratch until the tree is written
  const bool ok = i < 255 ? q[i] <= q[i + 1] : true;
  const bool is_sorted = __syncthreads_and(ok);
  if (i < 256) {
    const float v = q[i];
    const int rank = is_sorted ? i : stable_rank(q, i);
    sorted[rank] = v;
    t.info[rank] = static_cast<uint16_t>(i | (signbit(v) ? 0x100 : 0));
  }
  if (i == 0) *bad_flag = 0;
  __syncthreads();
  if (i < 255) t.mids[i] = __fdiv_rn(__fadd_rn(sorted[i], sorted[i + 1]), 2.0f);
  if (i == 255) t.mids[255] = __int_as_float(0x7f800000);
  __syncthreads();
  if (i >= 1 && i < 256) t.tree[i] = t.mids[eytzinger_position(i)];
  if (i == 0) t.tree[0] = 0.0f;
  if (i < 255) {
    const float m = t.mids[i];
    int bad = 0;
    if (!(m >= -2.0f && m < 2.0f)) bad = (1 << kNumConfigs) - 1;  // NaN x must find every midpoint below
    if (m < 0.0f) bad |= kPositiveOnlyMask;
    if (i < 254) {
      const float m2 = t.mids[i + 1];
      if (m != m2) {
        for (int c = 0; c < kNumConfigs; ++c) {
          const int id = inside_id(m, kConfigM[c]);
          if (id >= 0 && id == inside_id(m2, kConfigM[c])) bad |= 1 << c;
        }
      }
    }
    if (bad) atomicOr(bad_flag, bad);
  }
  __syncthreads();
  const int bad = *bad_flag;
  int c = 0;
  while (c < kNumConfigs && ((bad >> c) & 1)) ++c;
  CodeTableParams tp;
  tp.fast = c < kNumConfigs && !force_tree;
  const int M = tp.fast ? kConfigM[c] : 4;
  const bool pos_only = tp.fast && kConfigPos[c];
  tp.shift = 23 - M;
  tp.bias = (103 << M) - 1;
  tp.nb = (25 << M) + 2;
  tp.negmask = pos_only ? 0u : 0xffffffffu;
  if (tp.fast) {
    const int size = pos_only ? tp.nb + 1 : 2 * tp.nb;
    for (int e = i; e < size; e += blockDim.x) {
      const bool neg = e >= tp.nb;
      const int b = neg ? e - tp.nb : e;
      const float lo = b == 0 ? 0.0f : __uint_as_float(uint32_t(b + tp.bias) << tp.shift);
      const float hi = b == tp.nb - 1 ? __int_as_float(0x7f800000) : __uint_as_float(uint32_t(b + 1 + tp.bias) << tp.shift);
      int base, k;
      if (!neg) {  // x in [lo, hi)
        base = count_below<false>(t.mids, lo);
        k = count_below<false>(t.mids, hi) - base;
      } else if (pos_only) {
        base = 0, k = 0;
      } else {  // x in (-hi, -lo], x < 0
        base = count_below<true>(t.mids, -hi);
        k = count_below<false>(t.mids, -lo) - base;
      }
      const float mid = k > 0 ? t.mids[base] : __int_as_float(0x7f800000);
      t.entry[e] = make_uint2(__float_as_uint(mid), uint32_t(t.info[base]) | (uint32_t(t.info[base + k]) << 16));
    }
  }
  __syncthreads();
  return tp;
}

// code index | signbit(code value) << 8 of the nearest code to x (x: a value scaled by 1/absmax).
template <bool FAST>
__device__ __forceinline__ uint32_t nearest_info(float x, const CodeTable& t, const CodeTableParams& tp) {
  if constexpr (FAST) {
    const int b = bin_of(__float_as_uint(x) & 0x7fffffffu, tp.shift, tp.bias, tp.nb);
    const uint32_t idx = x < 0.0f ? uint32_t(tp.nb) + (uint32_t(b) & tp.negmask) : uint32_t(b);
    const uint2 e = t.entry[idx];
    return (__uint_as_float(e.x) < x ? e.y >> 16 : e.y) & 0x1ffu;
  } else {
    int node = 1;
#pragma unroll
    for (int level = 0; level < 8; ++level) node = 2 * node + (!(t.tree[node] >= x) ? 1 : 0);
    return t.info[node - 256];
  }
}

}  // namespace lowbit
