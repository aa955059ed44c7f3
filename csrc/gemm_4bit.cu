// CUDA kernel of lowbit::gemm_4bit: out = A @ dequantize(B).T (+ bias) for a packed NF4/FP4 weight B of
// shape (N, K) = (out_features, in_features), A of shape (..., K) in fp16/bf16/fp32, output in A's dtype.
//
// Few rows of A (m <= fused_max_m(), default 32, fp16/bf16, K % 32 == 0): one fused kernel that streams the
// packed weight once and multiplies on the tensor cores (mma.sync m16n8k16, float32 accumulation).
//   - The MMA's M dimension (lane g of a quad group takes M rows g and g + 8) and N dimension (8 columns an
//     n-tile) are split between rows and k-segments: with S segments (S = 8, 4, 2 for m = 1, 2, 3-4, else 1)
//     M row g is weight row g / S and N column n row n / S of A, both at segment g % S (n % S) of the round's
//     k, so the products of matching segments lie where M row % S == column % S and the epilogue sums them.
//     A warp takes MT m-tiles of 16 / S weight rows; with S > 1 the quads of a row read consecutive bytes, so
//     the warp's loads of a row are contiguous (the MMA's columns that m leaves idle pay for it). Rows of A past
//     m repeat row m - 1 and feed only outputs that are never stored; more than 32 rows run in launches of 32.
//   - m > 8 (2 or 4 n-tiles), and m <= 4 on large weights (two_m_tiles: those reordered, below, and from 16 MiB on GPUs
//     with fast memory for their SMs): MT = 2, so each activation register a warp loads serves two m-tiles. The
//     activations, read by every warp from L1, were the largest share of the L1 traffic that limits the kernel (ncu,
//     8192x28672, m = 32: L1 85% busy, issue 19%). m > 8: 183-254 registers, one CTA an SM; m <= 4: 128 registers and
//     two CTAs an SM, the activations loaded a round ahead instead of an iteration. Measured, ms, MT = 1 / 2, m = 1
//     (m = 2): H200 8192x28672 0.0458 / 0.0442 (0.0490 / 0.0436), 8192x8192 0.0172 / 0.0155, 4096x14336
//     0.0168 / 0.0159, 4096x4096 0.0062 / 0.0063; H100 8192x28672 0.0496 / 0.0485 (0.0521 / 0.0474), 8192x8192
//     0.0177 / 0.0183, 4096x14336 0.0173 / 0.0176 (0.0167 / 0.0180), 4096x4096 0.0064 / 0.0070. Half the warps of
//     MT = 1 pay where the weight is short of rows (one or two waves) and the memory is the nearer limit (H100), hence
//     the rule. m = 3-4, MT = 1 / 2: H200 8192x8192 0.0187 / 0.0177, 14336x4096 0.0164 / 0.0155, 8192x28672 0.0531 /
//     0.0526; H100 8192x28672 0.0556 / 0.0541, 28672x8192 0.0539 / 0.0511. At m = 5-8 MT = 2 measured slower (H200,
//     8192x28672 m = 8 0.0655 / 0.0775).
//   - The 16 code values, rounded to A's 16-bit type, make a byte table in shared memory: entry b holds
//     code[b >> 4] | code[b & 15] << 16, so one lookup per packed byte gives an A-fragment register (two
//     consecutive k). Entries are 256 bytes apart with lane l's copy at 4 * l (each lane its own bank), so one
//     PRMT of the packed word and the lane offset forms the address: a lookup is one PRMT and one LDS. The other
//     128 bytes of each entry hold lane copies of the nested absmax code, so its lookups never conflict either.
//   - The dot product over k is order-free, so each thread takes consecutive bytes of its rows and the
//     activations at the same k (raw 32-bit words are B-fragment registers): lane t of quad g reads VEC bytes
//     at byte ((g % S) * 4 + t) * VEC of a 4 * S * VEC-byte "round"; a quad's 4 * VEC bytes lie inside one
//     quantization block (VEC = min(8, gcd(K, blocksize) / 8)); the MMAs of a round accumulate code * a into
//     a temporary that is scaled by the block's float32 absmax once per round.
//   - For large weights (TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB, default 64) a small kernel first copies the activations
//     into the order the lanes read them (fragment_order_kernel), so that each load of a warp is 4 whole lines.
//   - The absmax is decoded in the loop, as the reference does it: nested_code[q] * nested_absmax[b /
//     nested_blocksize] + offset, each operation rounded in float32 (no FMA contraction). Each lane of a quad
//     decodes MT of the iteration's 4 MT (two rounds x 2 MT rows) and shuffles share them.
//   - Iterations of two rounds are double-buffered in registers (weights, absmax, and with one m-tile of one n-tile
//     the activations; two m-tiles (m <= 4 on large weights) load those a round ahead, more n-tiles a round at a
//     time), two stages that alternate; full iterations run without predicates, and the rest of K (a multiple of
//     4 VEC bytes) one predicated iteration at the end. A deeper ring (3, 4, 6 stages of weights and absmax,
//     activations a round ahead) measured slower: H200, 8192x28672 m = 1 0.0506 / 0.0502 / 0.0592 ms against 0.0458
//     with two.
//   - A CTA is 4-8 warps: WR warps along rows times WK warps along k (split-K, summed through shared memory per
//     tile). CTAs are persistent (as many as fit) and loop over tiles of MT * 16 / S * WR rows; the CTA shape is
//     the one with the fewest rows an SM (choose_shape: split-K costs more than a few idle CTAs).
//     Bias is added in float32 before the final rounding.
//   - Precision: products of the code values rounded to A's dtype (relative error <= 2^-8 for bf16, 2^-11
//     for fp16: the output's own rounding) with A, accumulated in float32, times the exact float32 absmax.
// 33-256 rows on Hopper, where the grid has enough tiles: the fused wgmma kernels of gemm_4bit_wgmma.cu.
// Larger m, fp32 A or K % 32 != 0: dequantize into A's dtype with lowbit::dequantize_4bit (the fast kernel of
// quantize_4bit.cu) and multiply with cuBLAS (at::mm/addmm).
// Tuning overrides (read once per process): TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M (rows up to which the fused
// kernel runs, in launches of 32), TORCHLOWBIT_GEMM4BIT_WARPS (warps of a CTA: 4-8), TORCHLOWBIT_GEMM4BIT_WR
// (of them along rows), TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M, TORCHLOWBIT_GEMM4BIT_WS_MAX_M,
// TORCHLOWBIT_GEMM4BIT_WGMMA_MIN_TILES (when the wgmma kernels run), TORCHLOWBIT_GEMM4BIT_WGMMA_WG (the first one's
// CTA size for up to 64 rows), TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB (weights from which the activations are
// reordered; 0: always) and TORCHLOWBIT_GEMM4BIT_TWO_TILES_MIN_MB (weights from which m <= 4 takes two m-tiles).
#include "gemm_4bit_device.h"
#include "gemm_4bit_wgmma.h"
#include "lowbit_quantize.h"
#include "packed_4bit.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <cmath>
#include <cstdlib>

namespace lowbit {
namespace {

constexpr int kGemvThreads = 256;  // at most 8 warps a CTA (p.warps)
constexpr int kTableBytes = 256 * 256;  // byte table: entry b at 256 * b, lane l's copy at + 4 * l (nested code: + 128)
constexpr int kFusedMaxMDefault = 32;  // measured crossover with dequantize + cuBLAS: 32-64 rows

struct GemvParams {
  const uint8_t* packed;  // (N, K / 2) bytes, rows 4 * VEC-byte aligned
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
  int warps;      // warps of a CTA (blockDim.x / 32)
  int wr;         // of them along rows (MT * 16 / S rows each); warps / wr along k
  int n_tiles;    // ceil(N / (MT * 16 / S * wr))
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

// VEC bytes (8 or 4) of a packed row as VEC / 4 words.
template <int VEC>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t (&w)[VEC / 4]) {
  if constexpr (VEC == 8) {
    const uint2 v = load_stream8(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = load_stream4(p);
  }
}

// Launches of one n-tile (m <= 8, two CTAs an SM) overlap the previous kernel of the stream (programmatic dependent
// launch): a CTA at its last tile lets the next kernel's CTAs start, which wait for it before their first access to
// memory (H200, ms, m = 1 and 8: 4096x4096 0.0074 -> 0.0065 and 0.0091 -> 0.0085, 4096x14336 0.0175 -> 0.0169 and
// 0.0222 -> 0.0216, 8192x28672 0.0512 -> 0.0506 and 0.0712 -> 0.0706). With more n-tiles (one CTA an SM) it measured
// 2% slower (8192x28672 m = 32).
template <int NT>
constexpr bool kOverlapsPrevious = NT == 1;

// NT: n-tiles of 8 rows of A; MT: m-tiles (16 / S weight rows each) a warp, sharing the activations it loads; VEC:
// bytes a lane reads from each of its rows per round; S: k-segments a row is split into (the MMA rows and columns
// that meet on the diagonal of segment s make the useful products).
template <typename T, int NT, int MT, int VEC, int S, bool FRAG>
__global__ void __launch_bounds__(kGemvThreads, NT == 1 ? 2 : 1) gemv_4bit_kernel(const GemvParams p) {
  static_assert(!FRAG || VEC == 8, "activations in fragment order: 16 bytes a lane and load");
  static_assert(S == 1 || NT == 1, "k-segments use the idle columns of one n-tile");
  constexpr int W = VEC / 4;
  constexpr int kRounds = 2;  // rounds an iteration (its weights and absmax are loaded as a whole, an iteration ahead)
  constexpr int kRows = 2 * MT;  // weight rows of a lane: MMA rows g and g + 8 of each m-tile
  constexpr int kQuadElems = 8 * VEC;  // a quad's elements of a row in one round: inside one block
  constexpr int kRoundElems = S * kQuadElems;
  constexpr int kRoundBytes = kRoundElems / 2;
  constexpr int kIterElems = kRounds * kRoundElems;
  constexpr int kTileRows = 16 / S;         // weight rows of an m-tile: MMA row g is row g / S, segment g % S
  constexpr int kWarpRows = MT * kTileRows;
  constexpr int kRowsA = NT * 8 / S;        // rows of A of a launch: MMA column n is row n / S, segment n % S
  constexpr int kLaneAbsmax = kRounds * kRows / 4;  // absmax values a lane of a quad decodes an iteration
  // Rounds of activations loaded ahead: a whole iteration with the weights (one m-tile of one n-tile), one round (two
  // m-tiles: registers for one), none (more n-tiles: a round at a time).
  constexpr int kXAhead = NT > 1 ? 0 : MT == 1 ? kRounds : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_red = reinterpret_cast<float*>(smem + kTableBytes);  // fragments: [warp][MT * NT * 4][lane]

  // byte table: entry b = code[b >> 4] | code[b & 15] << 16 in T (an A-fragment register: two consecutive k), and
  // 128 bytes on the nested absmax code b (float32): each lane its own copy of both, so that lookups never conflict
  auto table_entry = [&](int b) {
    const float c_hi = p.fp4 ? kFP4Code[b >> 4] : kNF4Code[b >> 4];
    const float c_lo = p.fp4 ? kFP4Code[b & 15] : kNF4Code[b & 15];
    const uint32_t v = Mma<T>::bits(c_hi) | (Mma<T>::bits(c_lo) << 16);
    const uint32_t c = __float_as_uint(p.nested ? __ldg(p.nested_code + b) : 0.0f);
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // rotated so that a quarter warp's 16-byte stores hit different banks
      reinterpret_cast<uint4*>(smem + 256 * b)[(q + b) & 7] = make_uint4(v, v, v, v);
      reinterpret_cast<uint4*>(smem + 256 * b + 128)[(q + b) & 7] = make_uint4(c, c, c, c);
    }
  };
  if constexpr (kOverlapsPrevious<NT>) wait_for_previous_grid();
  table_entry(threadIdx.x);
  if (threadIdx.x < 256 - blockDim.x) table_entry(threadIdx.x + blockDim.x);  // CTAs of fewer than 8 warps
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3, seg = g % S;
  const int wr = p.wr, wk = p.warps / wr, wr_idx = warp % wr, wk_idx = warp / wr;
  const int K = p.K, N = p.N, L = p.log2_block;
  const int64_t row_bytes = K >> 1;
  const int n_full = K / kIterElems;
  const int rem = K - n_full * kIterElems;  // a multiple of kQuadElems
  const uint32_t lane4 = 4 * lane;
  const float offset = p.nested ? __ldg(p.nested_offset) : 0.0f;

  // Rows of A past m repeat row m - 1: they only feed output columns that are never stored. In fragment order (FRAG,
  // fragment_order_kernel) a load of the warp is 512 contiguous bytes, this lane's at 16 * lane.
  const T* arow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    arow[j] = FRAG ? static_cast<const T*>(p.A) + lane * 8
                   : static_cast<const T*>(p.A) + int64_t(min(8 * j + g / S, p.m - 1)) * K + seg * kQuadElems +
                         2 * VEC * t;
  }

  for (int tile = blockIdx.x; tile < p.n_tiles; tile += gridDim.x) {
    if (kOverlapsPrevious<NT> && tile + gridDim.x >= p.n_tiles) allow_next_grid();  // this CTA's last tile
    const int64_t row_base = int64_t(tile) * kWarpRows * wr + wr_idx * kWarpRows;
    // This thread's row i (MMA row g + 8 (i & 1) of m-tile i / 2), clamped to the weight.
    auto lane_row = [&](int i) {
      return min(row_base + (i >> 1) * kTileRows + (i & 1) * (8 / S) + g / S, int64_t(N) - 1);
    };
    const int lane_byte = seg * 4 * VEC + t * VEC;
    const uint8_t* wp[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) wp[i] = p.packed + lane_row(i) * row_bytes + lane_byte;
    // An iteration's absmax value v = round * kRows + row is decoded by lane v % 4 of the quad (its register v / 4);
    // shuffles share them. Blocks are counted from the row's first one, so that offsets in the loop are 32-bit.
    int mine_k[kLaneAbsmax], row_rem[kLaneAbsmax], row_nrem[kLaneAbsmax];
    const uint8_t* q_row[kLaneAbsmax];
    const float* s_row[kLaneAbsmax];
#pragma unroll
    for (int c = 0; c < kLaneAbsmax; ++c) {
      const int v = 4 * c + t;
      mine_k[c] = (v / kRows) * kRoundElems + seg * kQuadElems;
      const int64_t row_e = lane_row(v % kRows) * K;
      const int64_t row_blk = row_e >> L, row_nblk = row_blk >> p.log2_nested;
      row_rem[c] = static_cast<int>(row_e - (row_blk << L));
      row_nrem[c] = static_cast<int>(row_blk - (row_nblk << p.log2_nested));
      q_row[c] = p.nested ? p.absmax_q + row_blk : nullptr;
      s_row[c] = p.nested ? p.nested_absmax + row_nblk : p.absmax + row_blk;
    }

    // An iteration's operands: weight words of the lane's rows, activations (kXAhead == kRounds), raw absmax (uint8
    // code and nested scale, or the float32 absmax).
    struct Stage {
      uint32_t w[kRows][kRounds][W];
      uint32_t x[kXAhead == kRounds ? kRounds : 1][NT][VEC];
      uint32_t q[kLaneAbsmax];
      float s[kLaneAbsmax];
    };
    // This lane's absmax c of the iteration at element k of the row.
    auto load_absmax = [&](int k, int c, Stage& st) {
      const int b = (row_rem[c] + k + mine_k[c]) >> L;
      if (p.nested) {
        st.q[c] = __ldg(q_row[c] + b);
        st.s[c] = __ldg(s_row[c] + ((row_nrem[c] + b) >> p.log2_nested));
      } else {
        st.s[c] = __ldg(s_row[c] + b);
      }
    };
    auto load_x = [&](int k, int u, uint32_t (&x)[NT][VEC]) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < W; ++q) {
          const T* src = FRAG ? arow[j] + (k + u * kRoundElems) * kRowsA + (j * W + q) * 256
                              : arow[j] + k + u * kRoundElems + 8 * q;
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
          x[j][4 * q] = v.x, x[j][4 * q + 1] = v.y, x[j][4 * q + 2] = v.z, x[j][4 * q + 3] = v.w;
        }
    };
    auto load_round = [&](int k, int u, Stage& st) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) load_bytes<VEC>(wp[i] + (k >> 1) + u * kRoundBytes, st.w[i][u]);
    };
    auto load_stage = [&](int k, Stage& st) {
#pragma unroll
      for (int u = 0; u < kRounds; ++u) {
        load_round(k, u, st);
        if constexpr (kXAhead == kRounds) load_x(k, u, st.x[u]);
      }
#pragma unroll
      for (int c = 0; c < kLaneAbsmax; ++c) load_absmax(k, c, st);
    };

    // As the reference decodes it: code * nested_absmax + offset, each operation rounded (no FMA).
    auto decode_absmax = [&](const Stage& st, float (&am)[kLaneAbsmax]) {
#pragma unroll
      for (int c = 0; c < kLaneAbsmax; ++c) {
        am[c] = p.nested ? __fadd_rn(__fmul_rn(*reinterpret_cast<const float*>(smem + (st.q[c] << 8) + 128 + lane4),
                                               st.s[c]), offset)
                         : st.s[c];
      }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.0f;

    // Round u: the bytes of each m-tile's two rows times the activations x (this lane's 2 * VEC elements of each
    // n-tile's row), MMAs into a temporary, then times the rows' block absmax (shuffled from the quad's lanes).
    auto round = [&](const Stage& st, int u, const uint32_t (&x)[NT][VEC], const float (&am)[kLaneAbsmax]) {
      float tmp[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) tmp[mt][j][c] = 0.0f;
#pragma unroll
      for (int lb = 0; lb < VEC; lb += 2) {  // bytes lb (k 2t, 2t + 1 of the MMA) and lb + 1 (k 2t + 8, 2t + 9)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t w0 = st.w[2 * mt][u][lb >> 2], w1 = st.w[2 * mt + 1][u][lb >> 2];
          const uint32_t a0 = *reinterpret_cast<const uint32_t*>(smem + table_offset(w0, lb & 3, lane4));
          const uint32_t a1 = *reinterpret_cast<const uint32_t*>(smem + table_offset(w1, lb & 3, lane4));
          const uint32_t a2 = *reinterpret_cast<const uint32_t*>(smem + table_offset(w0, (lb & 3) + 1, lane4));
          const uint32_t a3 = *reinterpret_cast<const uint32_t*>(smem + table_offset(w1, (lb & 3) + 1, lane4));
#pragma unroll
          for (int j = 0; j < NT; ++j) Mma<T>::mma(tmp[mt][j], a0, a1, a2, a3, x[j][lb], x[j][lb + 1]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int v0 = u * kRows + 2 * mt, v1 = v0 + 1;
        const float am0 = __shfl_sync(0xffffffffu, am[v0 / 4], (lane & ~3) | (v0 % 4));
        const float am1 = __shfl_sync(0xffffffffu, am[v1 / 4], (lane & ~3) | (v1 % 4));
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[mt][j][0] = fmaf(tmp[mt][j][0], am0, acc[mt][j][0]);
          acc[mt][j][1] = fmaf(tmp[mt][j][1], am0, acc[mt][j][1]);
          acc[mt][j][2] = fmaf(tmp[mt][j][2], am1, acc[mt][j][2]);
          acc[mt][j][3] = fmaf(tmp[mt][j][3], am1, acc[mt][j][3]);
        }
      }
    };

    // Full iterations (a warp's are wk apart, k their first element in the row), the next one's operands loaded
    // while this one multiplies, in two stages that alternate (two a trip, without copies). With activations a round
    // ahead xr[0] holds the iteration's first round on entry and the next iteration's on exit. The two spellings of the
    // trip below are the same steps; ptxas schedules them differently, and each is the one that measured faster for
    // its launches (H200, ms, the loop / the steps written out: MT = 2, m = 1, 8192x28672 0.0444 / 0.0476; m = 32
    // 4096x14336 0.0344 / 0.0328, 14336x4096 0.0311 / 0.0295).
    const int step = wk * kIterElems, k_full = n_full * kIterElems;
    int k = wk_idx * kIterElems;
    Stage ring[2];
    uint32_t xr[2][NT][VEC];
    if (k < k_full) {
      load_stage(k, ring[0]);
      if constexpr (kXAhead == 1) load_x(k, 0, xr[0]);
    }
    auto advance = [&](const Stage& cur, Stage& next) {
      if (k + step < k_full) load_stage(k + step, next);
      float am[kLaneAbsmax];
      decode_absmax(cur, am);
      if constexpr (kXAhead == kRounds) {
#pragma unroll
        for (int u = 0; u < kRounds; ++u) round(cur, u, cur.x[u], am);
      } else if constexpr (kXAhead == 1) {
        static_assert(kRounds == 2, "a round ahead: the iteration's second round, then the next one's first");
        load_x(k, 1, xr[1]);
        round(cur, 0, xr[0], am);
        if (k + step < k_full) load_x(k + step, 0, xr[0]);
        round(cur, 1, xr[1], am);
      } else {
#pragma unroll
        for (int u = 0; u < kRounds; ++u) {
          load_x(k, u, xr[0]);
          round(cur, u, xr[0], am);
        }
      }
      k += step;
    };
    if constexpr (kXAhead == 1) {
      while (k < k_full) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          if (k >= k_full) break;
          advance(ring[s], ring[s ^ 1]);
        }
      }
    } else {
      while (k < k_full) {
        advance(ring[0], ring[1]);
        if (k >= k_full) break;
        advance(ring[1], ring[0]);
      }
    }
    // The rest of K (rem elements, less than an iteration): the warp whose next iteration it would be. A quad
    // past K multiplies zeros (its bytes, absmax and activations; garbage activations could be NaN).
    if (k == k_full && rem > 0) {
      Stage& st = ring[0];
      float am[kLaneAbsmax];
#pragma unroll
      for (int c = 0; c < kLaneAbsmax; ++c) {
        st.q[c] = 0, st.s[c] = 0.0f;
        if (mine_k[c] < rem) load_absmax(k, c, st);
      }
      decode_absmax(st, am);
#pragma unroll
      for (int u = 0; u < kRounds; ++u) {
        if (u * kRoundElems >= rem) continue;
        const bool inside = u * kRoundElems + seg * kQuadElems < rem;
#pragma unroll
        for (int i = 0; i < kRows; ++i)
#pragma unroll
          for (int q = 0; q < W; ++q) st.w[i][u][q] = 0;
        if (inside) {
          load_round(k, u, st);
          load_x(k, u, xr[0]);
        } else {  // S > 1 only: with one segment whole rounds lie inside K
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < VEC; ++q) xr[0][j][q] = 0;
        }
        round(st, u, xr[0], am);
      }
    }

    // Split-K: the wk warps of a row group sum their fragments through shared memory.
    constexpr int kFrags = MT * NT * 4;
    float* mine = s_red + warp * kFrags * 32;
    if (wk > 1) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) mine[((mt * NT + j) * 4 + c) * 32 + lane] = acc[mt][j][c];
      __syncthreads();
      if (wk_idx == 0) {
        for (int kk = 1; kk < wk; ++kk) {
          const float* other = s_red + (kk * wr + wr_idx) * kFrags * 32;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[mt][j][c] += other[((mt * NT + j) * 4 + c) * 32 + lane];
        }
      }
    }
    // Epilogue: output (row row_base + r, row a of A) sums the fragment elements of its S segments, in order.
    // Row r is row rr of m-tile r / kTileRows; fragment element (MMA row G, column n) of n-tile j is
    // c = 2 (G >= 8) + (n & 1) of lane 4 (G % 8) + n / 2.
    if (wk_idx == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) mine[((mt * NT + j) * 4 + c) * 32 + lane] = acc[mt][j][c];
      __syncwarp();
      T* out = static_cast<T*>(p.out);
      for (int o = lane; o < kWarpRows * kRowsA; o += 32) {
        const int r = o % kWarpRows, a = o / kWarpRows, j = a / (8 / S);
        const int mt = r / kTileRows, rr = r % kTileRows;
        const int64_t row = row_base + r;
        if (row >= N || a >= p.m) continue;
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const int G = (rr % (8 / S)) * S + s, n = (a % (8 / S)) * S + s;
          sum += mine[((mt * NT + j) * 4 + 2 * (rr / (8 / S)) + (n & 1)) * 32 + 4 * G + (n >> 1)];
        }
        Elem<T>::store1(out + a * p.ldo + row, __fadd_rn(sum, load_bias(p.bias, p.bias_kind, row)));
      }
      __syncwarp();  // the fragments are rewritten by the next tile
    }
    if (wk > 1) __syncthreads();  // s_red is reused by the next tile
  }
}

int fused_max_m() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_FUSED_MAX_M", INT_MIN, INT_MAX, kFusedMaxMDefault);
  return value;
}

// Tuning override of the warps along rows of a CTA (1-8, a divisor of its warps; 0 or unset: the heuristic).
int forced_wr() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_WR", 1, 8, 0);
  return value;
}

// Tuning override of the warps a CTA (4-8; 0 or unset: the heuristic).
int forced_warps() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_WARPS", 4, 8, 0);
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

template <int NT, int MT>
constexpr int64_t gemv_smem_bytes() {
  return kTableBytes + int64_t(kGemvThreads) * MT * NT * 4 * 4;
}

struct CtaShape {
  int warps;            // warps of a CTA
  int wr;               // of them along rows (the rest split K)
  int64_t sm_rows = 0;  // weight rows of the busiest SM: waves * CTAs an SM * rows a tile
};

// The CTA shape with the least modelled time: the kernel is bound by each SM's load pipe (ncu), so time goes with
// the rows an SM takes, waves * CTAs an SM * rows a tile; split-K costs a quarter more (measured on an H200:
// 4096x14336, m = 1, 8 warps along rows 0.0187 ms against 0.0208 with 4 and an even spread). Fewer than 8 warps
// a CTA fill the SMs where tiles of 8 warps leave some idle (8192x28672, m = 32: 112 tiles on 132 SMs).
// `per_sm[w]`: CTAs of w warps that fit on an SM.
CtaShape choose_shape(int64_t N, int64_t warp_rows, const std::array<int, 9>& per_sm) {
  const int64_t sms = multiprocessor_count();
  CtaShape best{};
  double best_time = INFINITY;
  for (int warps = 8; warps >= 4; --warps) {
    if (forced_warps() != 0 && warps != forced_warps()) continue;
    for (int wr = warps; wr >= 1; --wr) {
      if (warps % wr != 0 || (forced_wr() != 0 && wr != forced_wr())) continue;
      const int64_t tiles = ceil_div(N, warp_rows * wr), slots = per_sm[warps] * sms;
      const int64_t sm_rows = ceil_div(tiles, slots) * per_sm[warps] * wr * warp_rows;
      const double time = double(sm_rows) * (wr < warps ? 1.25 : 1.0);
      if (time < best_time) best = {warps, wr, sm_rows}, best_time = time;
    }
  }
  TORCH_CHECK_VALUE(best_time < INFINITY, "environment variable TORCHLOWBIT_GEMM4BIT_WR (", num(forced_wr()),
                    ") must divide TORCHLOWBIT_GEMM4BIT_WARPS (", num(forced_warps()), ")");
  return best;
}

// CTAs of w warps of the instantiation that fit on an SM, [w] for w = 4-8. Its shared-memory limit is raised first:
// without that a kernel of more than 48 KB fits 0 CTAs.
template <typename T, int NT, int MT, int VEC, int S, bool FRAG>
std::array<int, 9> gemv_ctas_per_sm() {
  raise_smem_limit<gemv_4bit_kernel<T, NT, MT, VEC, S, FRAG>>(gemv_smem_bytes<NT, MT>());  // the 64 KB table
  return per_device([](int) {
    std::array<int, 9> n{};
    for (int w = 4; w <= 8; ++w) {
      n[w] = ctas_per_sm<gemv_4bit_kernel<T, NT, MT, VEC, S, FRAG>>(32 * w, gemv_smem_bytes<NT, MT>());
    }
    return n;
  });
}

template <typename T, int NT, int MT, int VEC, int S, bool FRAG>
CtaShape gemv_shape(int64_t N) {
  return choose_shape(N, MT * 16 / S, gemv_ctas_per_sm<T, NT, MT, VEC, S, FRAG>());
}

template <typename T, int NT, int MT, int VEC, int S, bool FRAG>
void launch_gemv(GemvParams p) {
  auto kernel = gemv_4bit_kernel<T, NT, MT, VEC, S, FRAG>;
  const CtaShape shape = gemv_shape<T, NT, MT, VEC, S, FRAG>(p.N);
  p.warps = shape.warps;
  p.wr = shape.wr;
  p.n_tiles = static_cast<int>(ceil_div(int64_t(p.N), int64_t(MT * 16 / S) * p.wr));
  const int64_t slots = int64_t(gemv_ctas_per_sm<T, NT, MT, VEC, S, FRAG>()[p.warps]) * multiprocessor_count();
  const int grid = static_cast<int>(std::min<int64_t>(slots, p.n_tiles));
  launch_kernel(kernel, grid, 32 * p.warps, gemv_smem_bytes<NT, MT>(), kOverlapsPrevious<NT>, p);
}

// The activations of a launch in the order the fused kernel's lanes read them (its FRAG instantiations): 16-byte
// chunk d is lane d % 32's of load (d / 32) % 2 of n-tile (d / 64) % NT in round d / (64 NT), the 8 elements at
// k = round * 64 S + (g % S) * 64 + 16 t + 8 q of row 8 j + g / S (g = lane / 4, t = lane % 4), zeros past m rows and
// K. A load of the kernel is then 512 contiguous bytes, 4 lines, where the rows' layout makes it 8 lines each used
// by half, and the L1 (the kernel's limit) pays per line. Launched overlapping the kernels before and after it.
__global__ void fragment_order_kernel(const uint4* A, uint4* out, int m, int K, int S, int NT, int64_t chunks) {
  allow_next_grid();
  wait_for_previous_grid();
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= chunks) return;
  const int lane = static_cast<int>(d & 31), q = static_cast<int>((d >> 5) & 1);
  const int j = static_cast<int>((d >> 6) % NT);
  const int64_t round = (d >> 6) / NT;
  const int g = lane >> 2, t = lane & 3, row = 8 * j + g / S;
  const int64_t k = round * 64 * S + (g % S) * 64 + 16 * t + 8 * q;
  out[d] = row < m && k < K ? A[(int64_t(row) * K + k) / 8] : make_uint4(0, 0, 0, 0);
}

// Packed weights of at least this many MiB (TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB) have the fused kernel read its
// activations in fragment order. The reordering kernel costs ~1 us against a kernel 7-13% faster on the H200 (ms, as
// they are / reordered: 8192x28672 m = 1 0.0502 / 0.0457, m = 32 0.1076 / 0.0963; 8192x8192 m = 1 0.0170 / 0.0166;
// 4096x14336 m = 1 0.0166 / 0.0170; 4096x4096 0.0061 / 0.0071). The H100, closer to its memory's limit, gains less:
// 8192x28672 m = 1 / 8 / 32 1-3% / 5% / 10%, 8192x8192 m = 1 5-9% slower. Hence 64 MiB.
int reorder_min_mb() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_REORDER_MIN_MB", 0, INT_MAX, 64);
  return value;
}

// Peak memory bandwidth of the current device an SM, in GB/s (0 where the device does not report it).
double memory_gbps_per_sm() {
  const double khz = device_attribute<cudaDevAttrMemoryClockRate>();
  const double bus_bits = device_attribute<cudaDevAttrGlobalMemoryBusWidth>();
  return 2.0 * khz * 1e3 * bus_bits / 8.0 / 1e9 / multiprocessor_count();
}

// Tuning override: packed weights of at least this many MiB read as they are take two m-tiles a warp at m <= 4
// (unset: two_m_tiles' rule).
int forced_two_tiles_min_mb() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_TWO_TILES_MIN_MB", 0, INT_MAX, -1);
  return value;
}

// Whether m <= 4 on an (N, K) weight read as it is takes two m-tiles a warp (see the kernel's comment; reordered
// weights always do): from 16 MiB of packed weight where the memory is fast for its SMs (>= 30 GB/s an SM), unless
// the taller tiles leave the busiest SM more rows. Measured, m = 1, ms, one / two m-tiles: H200 (36 GB/s an SM)
// 8192x8192 0.0173 / 0.0155, 4096x14336 0.0168 / 0.0159, 14336x4096 0.0149 / 0.0134, 4096x4096 0.0063 / 0.0062,
// 4096x11008 0.0133 / 0.0144 (2 waves of the taller tiles at 87% against 3 at 99%); H100 (25 GB/s an SM) 8192x8192
// 0.0177 / 0.0183, 4096x14336 0.0173 / 0.0176, 4096x4096 0.0064 / 0.0070.
template <typename T, int S>
bool two_m_tiles(int64_t N, int64_t K) {
  const int64_t bytes = N * K / 2;
  if (forced_two_tiles_min_mb() >= 0) return bytes >= (int64_t(forced_two_tiles_min_mb()) << 20);
  return bytes >= (int64_t(16) << 20) && memory_gbps_per_sm() >= 30.0 &&
         gemv_shape<T, 1, 2, 8, S, false>(N).sm_rows <= gemv_shape<T, 1, 1, 8, S, false>(N).sm_rows;
}

template <typename T, int NT, int MT, int S>
void launch_gemv_vec(GemvParams p, int vec, bool reorder, const at::TensorOptions& options) {
  constexpr int kTwoMT = NT == 1 && S >= 2 ? 2 : MT;
  if (vec != 8) return launch_gemv<T, NT, MT, 4, S, false>(p);
  if (!reorder) {
    if constexpr (kTwoMT != MT) {
      if (two_m_tiles<T, S>(p.N, p.K)) return launch_gemv<T, NT, kTwoMT, 8, S, false>(p);
    }
    return launch_gemv<T, NT, MT, 8, S, false>(p);
  }
  constexpr int64_t kRound = 64 * S;
  const int64_t chunks = int64_t(NT * 8 / S) * ceil_div(int64_t(p.K), kRound) * kRound / 8;
  const at::Tensor ordered = at::empty({chunks * 8}, options);
  launch_kernel(fragment_order_kernel, static_cast<unsigned>(ceil_div(chunks, int64_t(256))), 256, 0, true,
                static_cast<const uint4*>(p.A), static_cast<uint4*>(ordered.data_ptr()), p.m, p.K, S, NT, chunks);
  p.A = ordered.data_ptr();
  launch_gemv<T, NT, kTwoMT, 8, S, true>(p);
}

// The fused path for all rows of A2 (M, K) into out2 (M, N); false where it does not apply.
bool gemv_fused(const at::Tensor& A2, const at::Tensor& packed, const at::Tensor& absmax, int log2_block, int fp4,
                const at::Tensor* nested_absmax, const at::Tensor* nested_code, const at::Tensor* nested_offset,
                int log2_nested, const at::Tensor* bias, int64_t N, int64_t K, at::Tensor& out2) {
  const int64_t M = A2.size(0);
  if (M > fused_max_m() || K % 32 != 0 || K <= 0 || K > (int64_t(1) << 30) || N >= (int64_t(1) << 31)) return false;
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) return false;

  GemvParams p{};
  fill_weight(p, packed, absmax, log2_block, fp4, nested_absmax, nested_code, nested_offset, log2_nested, bias, N, K);
  p.ldo = N;
  const int64_t g = gcd64(K, int64_t(1) << log2_block);
  const int vec = static_cast<int>(std::min<int64_t>(8, g / 8));  // 16 spills registers

  const int64_t elem = A2.element_size();
  const bool reorder = N * K / 2 >= (int64_t(reorder_min_mb()) << 20);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    p.m = static_cast<int>(std::min<int64_t>(32, M - m0));
    p.A = static_cast<const char*>(A2.data_ptr()) + m0 * K * elem;
    p.out = static_cast<char*>(out2.data_ptr()) + m0 * N * elem;
    dispatch_float(A2.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if constexpr (std::is_same_v<scalar_t, float>) {
        TORCH_INTERNAL_ASSERT(false, "gemv_fused: float32 A");
      } else if (p.m == 1) {
        launch_gemv_vec<scalar_t, 1, 1, 8>(p, vec, reorder, A2.options());
      } else if (p.m == 2) {
        launch_gemv_vec<scalar_t, 1, 1, 4>(p, vec, reorder, A2.options());
      } else if (p.m <= 4) {
        launch_gemv_vec<scalar_t, 1, 1, 2>(p, vec, reorder, A2.options());
      } else if (p.m <= 8) {
        launch_gemv_vec<scalar_t, 1, 1, 1>(p, vec, reorder, A2.options());
      } else if (p.m <= 16) {
        launch_gemv_vec<scalar_t, 2, 2, 1>(p, vec, reorder, A2.options());
      } else {
        launch_gemv_vec<scalar_t, 4, 2, 1>(p, vec, reorder, A2.options());
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
    const at::Tensor* nested_args[3] = {nested ? &nabs : nullptr, nested ? &ncode : nullptr, nested ? &noff : nullptr};
    const at::Tensor* bias_arg = bias.has_value() ? &bias_c : nullptr;
    if (gemv_fused(A2, packed, am, log2_block, fp4, nested_args[0], nested_args[1], nested_args[2], log2_nested,
                   bias_arg, N, K, out2) ||
        gemm_4bit_wgmma(A2, packed, am, log2_block, fp4, nested_args[0], nested_args[1], nested_args[2], log2_nested,
                        bias_arg, N, K, out2)) {
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
