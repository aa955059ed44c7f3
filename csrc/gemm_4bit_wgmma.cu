// Many rows of A on Hopper: out = A @ dequantize(B).T (+ bias) in one kernel that dequantizes the packed weight
// into registers and multiplies on the tensor cores with wgmma (sm_90a), float32 accumulation. Two kernels: the one
// described here for 33-128 rows, and a warp-specialized one for 129-256 (further below).
//   - wgmma's M dimension is the weight's rows, so the dequantized weight is the register operand (A of wgmma) and
//     never goes through shared memory; N is BN rows of the activations (64, 128 or 256), the shared-memory operand
//     (B of wgmma), K-major as A is stored. A CTA is WG warpgroups of 64 weight rows each (4 for BN = 64 where such
//     tiles fill the GPU, else 2): a tile of 64 WG weight rows x BN rows of A, one tile a CTA, the tiles along A's
//     rows adjacent so that CTAs running together share weight rows in L2.
//   - Stages of 64 k (128 bytes of an activation row: the 128-byte swizzle's width), stages() - 2 copied ahead of
//     the multiply, all with cp.async: the activations into the swizzled layout wgmma reads, the absmax one stage
//     further ahead, the weights 4 stages (a row's 128-byte line) at a time, one stage further ahead. Rows of A past
//     m repeat row m - 1 and feed only outputs that are never stored.
//   - Weights: a thread's A-fragment registers hold rows g and g + 8 of its warp's 16 at k 2t, 2t + 1 and 2t + 8,
//     2t + 9 of each 16 (lane = 4 g + t), i.e. byte t of each 4-byte word of a row. The quad of a row loads its
//     words t and t + 4 of the stage's 32 bytes and transposes the bytes among its lanes (two shuffles and two
//     PRMTs a word), then each byte is looked up in a table of float32 code pairs (128 bytes an entry, lanes l and
//     l + 16 sharing the copy at 8 (l % 16): an LDS.64's half warps are separate wavefronts, so PRMT, shift and
//     one conflict-free LDS.64), multiplied by the block's float32 absmax and rounded to A's dtype: weights
//     bit-identical to dequantize_4bit's. The next stage's weights are dequantized while the tensor cores multiply
//     this one.
//   - The absmax (decoded as the reference does, nested or plain) is per row and stage: blocksize >= 64.
// Output: each thread stores its accumulators (plus the bias, in float32) rounded to A's dtype.
// Above 256 rows (or where the tiles do not fill the GPU) the caller dequantizes and runs cuBLAS.
#include "gemm_4bit_wgmma.h"

#include "gemm_4bit_device.h"
#include "hopper.h"
#include "lowbit_quantize.h"

#include <climits>

namespace lowbit {
namespace {

constexpr int kStageK = 64;             // k a stage: 128 bytes of a 16-bit row, the swizzle's width
constexpr int kTableBytes = 256 * 128;  // entry b at 128 b: float32 code[b >> 4], code[b & 15]; lane l's at 8 (l % 16)
constexpr int kSmemBytes = 227 * 1024;  // the most a CTA can have (sm_90)

// A CTA: WG warpgroups of 64 weight rows each, BN rows of A.
template <int WG>
constexpr int threads() {
  return 128 * WG;
}
constexpr int tile_rows(int wg) {
  return 64 * wg;
}
// A stage's buffers: the activations (BN rows of 128 bytes), the absmax (a code word, then a scale, a row).
template <int BN>
constexpr int activation_stage_bytes() {
  return BN * 128;
}
template <int WG>
constexpr int scale_stage_bytes() {
  return 2 * tile_rows(WG) * 4;
}
template <int BN, int WG>
constexpr int stage_bytes() {
  return activation_stage_bytes<BN>() + scale_stage_bytes<WG>();
}
// Weights are copied 4 stages at a time: a row's 128-byte line.
constexpr int kWeightCopyStages = 4;
template <int WG>
constexpr int weight_copy_bytes() {
  return tile_rows(WG) * kWeightCopyStages * kStageK / 2;
}
// Weight copies in flight: the copies of the stages - 2 stages copied ahead, plus the one being dequantized (a
// buffer is rewritten once the 4 stages it holds are dequantized).
constexpr int weight_copies(int stages) {
  return (stages - 2 + kWeightCopyStages - 1) / kWeightCopyStages + 1;
}
constexpr int kFixedBytes = kTableBytes + 256 * 4 + 1024;  // table, nested code, room to align the stages

template <int BN, int WG>
constexpr int smem_bytes_for(int stages) {
  return kFixedBytes + stages * stage_bytes<BN, WG>() + weight_copies(stages) * weight_copy_bytes<WG>();
}
// Stages in shared memory, copied stages() - 2 ahead: as many as fit beside the table, at most 8.
template <int BN, int WG>
constexpr int stages() {
  int n = 8;
  while (n > 3 && smem_bytes_for<BN, WG>(n) > kSmemBytes) --n;
  return n;
}
template <int BN, int WG>
constexpr int smem_bytes() {
  return smem_bytes_for<BN, WG>(stages<BN, WG>());
}

struct WgmmaParams {
  const uint8_t* packed;  // (N, K / 2) bytes, 4-byte aligned rows
  const void* A;          // (m, K), 16-byte aligned rows
  void* out;              // (m, N)
  int m;
  int N;
  int K;
  int log2_block;
  int fp4;
  int nested;
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
  int log2_nested;
  const void* bias;
  int bias_kind;
  int a_tiles;  // tiles of BN rows along A
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

#define LOWBIT_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define LOWBIT_ACC8(i) LOWBIT_ACC4(i), LOWBIT_ACC4(i + 4)
#define LOWBIT_ACC32(i) LOWBIT_ACC8(i), LOWBIT_ACC8(i + 8), LOWBIT_ACC8(i + 16), LOWBIT_ACC8(i + 24)
// One m64nNk16 wgmma; OPERANDS: the N / 2 accumulators, the A fragment and the descriptor, as numbered in the asm
// (the accumulators first); SCALE: the scale-d operand's (1: d += a * b).
#define LOWBIT_WGMMA(N, TYPE, OPERANDS, SCALE, ...)                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                            \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " OPERANDS ", p, 1, 1, 0;\n}\n" \
               : __VA_ARGS__                                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
#define LOWBIT_WGMMA_TYPES(N, OPERANDS, SCALE, ...)        \
  if constexpr (std::is_same_v<T, at::BFloat16>) {         \
    LOWBIT_WGMMA(N, "bf16", OPERANDS, SCALE, __VA_ARGS__); \
  } else {                                                 \
    LOWBIT_WGMMA(N, "f16", OPERANDS, SCALE, __VA_ARGS__);  \
  }

// d (64 x N float32 of the warpgroup) += a (this thread's A fragment, 64 x 16) * the B operand (N x 16) at `desc`.
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float* d, const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (N == 64) {
    LOWBIT_WGMMA_TYPES(64,
                       "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                       "{%32, %33, %34, %35}, %36",
                       "%37", LOWBIT_ACC32(0));
  } else if constexpr (N == 128) {
    LOWBIT_WGMMA_TYPES(128,
                       "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                       "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                       "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                       "{%64, %65, %66, %67}, %68",
                       "%69", LOWBIT_ACC32(0), LOWBIT_ACC32(32));
  }
}
#undef LOWBIT_WGMMA_TYPES
#undef LOWBIT_WGMMA
#undef LOWBIT_ACC32
#undef LOWBIT_ACC8
#undef LOWBIT_ACC4

// Issues a stage's multiplies, acc (64 x BN of the warpgroup) += the A fragments `cur` (64 x 64) * the stage's
// activations at `desc` (BN x 64): wgmma's N is BN up to 128, else two of 128 a 16 k.
template <typename T, int BN>
__device__ __forceinline__ void multiply_stage(float (&acc)[BN / 2], const uint32_t (&cur)[4][4], uint64_t desc) {
  constexpr int kN = BN < 128 ? BN : 128;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
  wgmma_fence();
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16)
#pragma unroll
    for (int half = 0; half < BN / kN; ++half)
      wgmma_m64k16<T, kN>(acc + kN / 2 * half, cur[k16], desc + ((half * kN * 128 + 32 * k16) >> 4));
  wgmma_commit();
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
}

// Waits for every multiply in flight; acc then holds the tile's sums.
template <int BN>
__device__ __forceinline__ void finish_multiplies(float (&acc)[BN / 2]) {
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
}

// Byte t (this lane's index in its quad) of the quad's four words w (word j in lane j) into byte j: a 4 x 4 byte
// transpose, lanes t and t ^ 2 then t and t ^ 1 swapping halves.
__device__ __forceinline__ uint32_t quad_transpose(uint32_t w, int t) {
  const uint32_t u = __byte_perm(w, __shfl_xor_sync(0xffffffffu, w, 2), t < 2 ? 0x5410u : 0x3276u);
  return __byte_perm(u, __shfl_xor_sync(0xffffffffu, u, 1), (t & 1) ? 0x3715u : 0x6240u);
}

// A thread's accumulators (plus the bias, in float32) rounded into out: accumulator 4 i + 2 h + e of half `half` is
// weight row n + 8 h (the output's column), row a_base + 128 half + 8 i + 2 t + e of A.
template <typename T, int BN>
__device__ __forceinline__ void store_tile(const WgmmaParams& p, const float (&acc)[BN / 2], int64_t n, int a_base,
                                           int t) {
  constexpr int kN = BN < 128 ? BN : 128;  // wgmma's N
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (n + 8 * h >= p.N) continue;
    const float bias = load_bias(p.bias, p.bias_kind, n + 8 * h);
#pragma unroll
    for (int half = 0; half < BN / kN; ++half)
#pragma unroll
      for (int i = 0; i < kN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int a = a_base + kN * half + 8 * i + 2 * t + e;
          if (a < p.m) {
            Elem<T>::store1(out + int64_t(a) * p.N + n + 8 * h,
                            __fadd_rn(acc[kN / 2 * half + 4 * i + 2 * h + e], bias));
          }
        }
  }
}

// The code-pair table: entry b = thread b < 256, 16 copies of the float32 pair, stores rotated so that quarter warps
// hit distinct banks.
__device__ __forceinline__ void fill_code_pairs(unsigned char* table, int fp4, int b) {
  const float hi = fp4 ? kFP4Code[b >> 4] : kNF4Code[b >> 4];
  const float lo = fp4 ? kFP4Code[b & 15] : kNF4Code[b & 15];
  const uint4 v = make_uint4(__float_as_uint(hi), __float_as_uint(lo), __float_as_uint(hi), __float_as_uint(lo));
#pragma unroll
  for (int q = 0; q < 8; ++q) reinterpret_cast<uint4*>(table + 128 * b)[(q + b) & 7] = v;
}

// x (byte j: byte t of word 4 u + j of a row's 32 bytes of a stage, i.e. its k 2t and 2t + 1 of those 8) dequantized
// with absmax am into the row's half h of the stage's A fragments (see dequantize in the kernels).
template <typename T>
__device__ __forceinline__ void dequantize_bytes(const unsigned char* table, uint32_t x, uint32_t lane16, float am,
                                                 int h, int u, uint32_t (&frag)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 c = *reinterpret_cast<const float2*>(table + (table_offset(x, j, lane16) >> 1));
    frag[2 * u + (j >> 1)][2 * (j & 1) + h] = Elem<T>::pack2(__fmul_rn(c.x, am), __fmul_rn(c.y, am));
  }
}

// The 16 weights code[i] * am rounded to T (as dequantize_4bit rounds them) as two 16-byte tables in registers: byte i
// of lo (hi) is the low (high) byte of weight i.
template <typename T>
__device__ __forceinline__ void value_tables(const float (&code)[16], float am, uint32_t (&lo)[4], uint32_t (&hi)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = Elem<T>::pack2(__fmul_rn(code[4 * i], am), __fmul_rn(code[4 * i + 1], am));
    const uint32_t b = Elem<T>::pack2(__fmul_rn(code[4 * i + 2], am), __fmul_rn(code[4 * i + 3], am));
    lo[i] = __byte_perm(a, b, 0x6420);
    hi[i] = __byte_perm(a, b, 0x7531);
  }
}

// Byte i of the result: byte n_i of the 16-byte table t, n_i the i-th 4-bit field of a selector s (s7: s & 0x7777,
// `upper`: whether n_i >= 8 as PRMT's choice of byte i or 4 + i).
__device__ __forceinline__ uint32_t table16(const uint32_t (&t)[4], uint32_t s7, uint32_t upper) {
  return __byte_perm(__byte_perm(t[0], t[1], s7), __byte_perm(t[2], t[3], s7), upper);
}

// x as in dequantize_bytes, its weights looked up in the value tables of value_tables: no shared memory.
__device__ __forceinline__ void look_up_bytes(uint32_t x, const uint32_t (&lo)[4], const uint32_t (&hi)[4], int h, int u,
                                              uint32_t (&frag)[4][4]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {  // bytes 2q and 2q + 1: nibbles (k odd, k even, k odd, k even) from bit 0
    const uint32_t s = x >> 16 * q;
    const uint32_t s7 = s & 0x7777u, upper = 0x3210u | (s >> 1 & 0x4444u);
    const uint32_t l = table16(lo, s7, upper), hh = table16(hi, s7, upper);
    frag[2 * u + q][h] = __byte_perm(l, hh, 0x4051);      // byte 2q: the weight of k even in the low half
    frag[2 * u + q][2 + h] = __byte_perm(l, hh, 0x6273);  // byte 2q + 1
  }
}

template <typename T, int BN, int WG>
__global__ void __launch_bounds__(threads<WG>(), 1) gemm_4bit_wgmma_kernel(const WgmmaParams p) {
  constexpr int kThreads = threads<WG>(), kTileRows = tile_rows(WG);
  constexpr int kStages = stages<BN, WG>(), kAhead = kStages - 2;  // stages copied ahead of the multiply
  constexpr int kWeightCopies = weight_copies(kStages), kWeightCopyBytes = weight_copy_bytes<WG>();
  constexpr int kStageBytes = activation_stage_bytes<BN>();
  constexpr int kScaleStageBytes = scale_stage_bytes<WG>();
  constexpr int kChunks = BN * 8 / kThreads;  // 16-byte activation copies a thread a stage
  static_assert(BN * 8 % kThreads == 0, "every thread copies activations");
  constexpr int kWeightChunks = kWeightCopyBytes / 16 / kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The table at offset 0 (a lookup's address is then one register plus the window base, LDS [R + UR]); the stages
  // 1024-aligned after it, by pointer arithmetic on smem_raw (not through an integer, which would make accesses
  // generic ones).
  unsigned char* table = smem_raw;
  float* s_ncode = reinterpret_cast<float*>(table + kTableBytes);
  unsigned char* after = table + kTableBytes + 256 * 4;
  unsigned char* a_stages = after + ((1024 - (smem_addr(after) & 1023)) & 1023);
  unsigned char* s_stages = a_stages + kStages * kStageBytes;         // [stage][absmax code words, scales]
  unsigned char* w_copies = s_stages + kStages * kScaleStageBytes;    // [copy][row][128 bytes]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = lane & 3;
  if (tid < 256) {
    fill_code_pairs(table, p.fp4, tid);
    s_ncode[tid] = p.nested ? __ldg(p.nested_code + tid) : 0.0f;
  }

  const int K = p.K, L = p.log2_block, n_stages = K / kStageK;
  const int64_t w_base = int64_t(blockIdx.x / p.a_tiles) * kTileRows;
  const int a_base = (blockIdx.x % p.a_tiles) * BN;
  // Block of weight row r at element k of the row, as (row's first block, offset in it) so that k adds 32-bit.
  auto row_block = [&](int r, int64_t& blk, int& rem) {
    const int64_t e = min(w_base + r, int64_t(p.N) - 1) * K;
    blk = e >> L;
    rem = static_cast<int>(e - (blk << L));
  };

  // Copies, all cp.async (an ordinary load in flight would hold up the proxy fence of every stage):
  //   - activations of a stage, c = tid + kThreads i: row c / 8, 16-byte chunk c % 8 (swizzled by row % 8);
  //   - weights of 4 stages, chunk q = tid + kThreads i: row q / 8, 16-byte piece q % 8 (swizzled by row % 8: the
  //     dequantizing reads then hit distinct banks), so that 8 lanes copy a row's whole line;
  //   - absmax of a stage, row tid % kTileRows: the 4-byte word holding its code (tid < kTileRows, nested) or its
  //     scale.
  const T* a_src[kChunks];
  uint32_t a_dst[kChunks];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int c = tid + kThreads * i, r = c >> 3, chunk = c & 7;
    a_src[i] = static_cast<const T*>(p.A) + int64_t(min(a_base + r, p.m - 1)) * K + 8 * chunk;
    a_dst[i] = smem_addr(a_stages) + r * 128 + ((chunk ^ (r & 7)) << 4);
  }
  const int w_piece = tid & 7;
  const uint8_t* w_src[kWeightChunks];
#pragma unroll
  for (int i = 0; i < kWeightChunks; ++i) {
    const int r = (tid >> 3) + kThreads / 8 * i;
    w_src[i] = p.packed + min(w_base + r, int64_t(p.N) - 1) * (K >> 1) + 16 * w_piece;
  }
  const uint32_t w_dst = smem_addr(w_copies) + (tid >> 3) * 128 + ((w_piece ^ ((tid >> 3) & 7)) << 4);
  const int s_row = tid & (kTileRows - 1);
  const bool copies_code = tid < kTileRows;
  int64_t c_blk;
  int c_rem;
  row_block(s_row, c_blk, c_rem);
  const int64_t c_nblk = p.nested ? c_blk >> p.log2_nested : 0;
  const int c_nrem = p.nested ? static_cast<int>(c_blk - (c_nblk << p.log2_nested)) : 0;
  const uint32_t s_dst = smem_addr(s_stages) + 4 * tid;
  // Copy positions, advanced a stage at a time (each copy function takes the stages in order, once each): the
  // sources, the buffers, and row s_row's absmax: the address of its code byte (nested), its scale (nested absmax
  // or plain absmax), its k in the block and its block in the nested block.
  uintptr_t code_at = reinterpret_cast<uintptr_t>(p.absmax_q) + c_blk;
  const float* scale_at = p.nested ? p.nested_absmax + c_nblk : p.absmax + c_blk;
  int k_in_block = c_rem, block_in_nested = c_nrem, a_slot = 0, s_slot = 0, w_slot = 0;
  const int nested_blocks = p.nested ? 1 << p.log2_nested : 1;
  auto next_slot = [](int slot, int n) { return slot + 1 == n ? 0 : slot + 1; };
  // The absmax of stage s, and the weights of stages s to s + 3 where s % 4 == 0.
  auto copy_weights = [&](int s) {
    if (s >= n_stages) return;
    if (s % kWeightCopyStages == 0) {
      if (s + (w_piece >> 1) < n_stages) {
        const uint32_t dst = w_dst + w_slot * kWeightCopyBytes;
#pragma unroll
        for (int i = 0; i < kWeightChunks; ++i) cp_async16(dst + i * kThreads / 8 * 128, w_src[i]);
      }
#pragma unroll
      for (int i = 0; i < kWeightChunks; ++i) w_src[i] += kWeightCopyStages * kStageK / 2;
      w_slot = next_slot(w_slot, kWeightCopies);
    }
    if (!copies_code || p.nested) {  // warp-uniform
      const void* src = copies_code ? reinterpret_cast<const void*>(code_at & ~uintptr_t(3)) : scale_at;
      cp_async4(s_dst + s_slot * kScaleStageBytes, src);
    }
    s_slot = next_slot(s_slot, kStages);
    k_in_block += kStageK;
    if (k_in_block == 1 << L) {
      k_in_block = 0;
      ++code_at;
      block_in_nested = next_slot(block_in_nested, nested_blocks);
      if (block_in_nested == 0) ++scale_at;
    }
  };
  auto copy_activations = [&](int s) {
    if (s >= n_stages) return;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      cp_async16(a_dst[i] + a_slot * kStageBytes, a_src[i]);
      a_src[i] += kStageK;
    }
    a_slot = next_slot(a_slot, kStages);
  };

  // Dequantizing reads: rows g and g + 8 (h = 0, 1) of this warp's 16, words t and t + 4 of each stage's 32 bytes;
  // the code byte of a row's absmax is byte (block % 4) of the copied word.
  const int r0 = 16 * warp + (lane >> 2);
  int64_t d_blk[2];
  int d_rem[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) row_block(r0 + 8 * h, d_blk[h], d_rem[h]);
  const float offset = p.nested ? __ldg(p.nested_offset) : 0.0f;
  const uint32_t lane16 = 16 * (lane & 15);  // the lane's copy at 8 (lane % 16), doubled: table_offset's is halved
  // Stage s's A fragments: frag[k16][register], registers (row g, k 2t), (row g + 8, k 2t), (g, 2t + 8),
  // (g + 8, 2t + 8).
  auto dequantize = [&](int s, uint32_t (&frag)[4][4]) {
    const unsigned char* ws = w_copies + (s / kWeightCopyStages % kWeightCopies) * kWeightCopyBytes;
    const unsigned char* ss = s_stages + (s % kStages) * kScaleStageBytes;
    const int piece = 2 * (s % kWeightCopyStages);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 8 * h;
      const float scale = reinterpret_cast<const float*>(ss)[kTileRows + r];
      float am = scale;
      if (p.nested) {
        const int b = static_cast<int>(d_blk[h] & 3) + ((d_rem[h] + s * kStageK) >> L);
        const uint32_t q = ss[4 * r + (b & 3)];
        am = __fadd_rn(__fmul_rn(s_ncode[q], scale), offset);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(ws + r * 128 + (((piece + u) ^ (r & 7)) << 4) + 4 * t);
        dequantize_bytes<T>(table, quad_transpose(w, t), lane16, am, h, u, frag);
      }
    }
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

  const uint64_t desc0 = swizzle128_desc(smem_addr(a_stages));
  // Stage s: wait for its copies (activations of s, absmax of s + 1, weights up to s + 4), start those of s + kAhead
  // (into buffers whose readers every thread finished before this barrier), multiply, then dequantize stage s + 1
  // into `next` while the tensor cores run (its registers were read by stage s - 1's multiplies: wait for those
  // first).
  auto stage = [&](int s, const uint32_t (&cur)[4][4], uint32_t (&next)[4][4]) {
    cp_async_wait<kAhead - 1>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    copy_activations(s + kAhead);
    copy_weights(s + kAhead + 1);
    cp_async_commit();  // empty groups keep the count uniform
    multiply_stage<T, BN>(acc, cur, desc0 + (s % kStages) * (kStageBytes >> 4));  // the address field advanced
    wgmma_wait<1>();
    if (s + 1 < n_stages) dequantize(s + 1, next);
  };

  copy_weights(0);
  for (int s = 0; s < kAhead; ++s) {  // group s: activations of s, absmax of s + 1, weights of s + 1 (and of 0)
    copy_activations(s);
    copy_weights(s + 1);
    cp_async_commit();
  }
  cp_async_wait<kAhead - 1>();
  __syncthreads();  // the table and group 0
  uint32_t fa[4][4], fb[4][4];
  dequantize(0, fa);
  for (int s = 0; s < n_stages; s += 2) {
    stage(s, fa, fb);
    if (s + 1 < n_stages) stage(s + 1, fb, fa);
  }
  finish_multiplies<BN>(acc);
  store_tile<T, BN>(p, acc, w_base + r0, a_base, t);
}

#else  // not an sm_90a pass: gemm_4bit_wgmma never launches it (the host checks the device)

template <typename T, int BN, int WG>
__global__ void gemm_4bit_wgmma_kernel(const WgmmaParams) {}

#endif

// The warp-specialized kernel for more rows (129-256 by default): persistent clusters of two CTAs of three warpgroups
// walk pairs of tiles of 128 weight rows x 256 rows of A (adjacent weight tiles, one A tile), A's tiles adjacent.
// Warpgroup 0 feeds a ring of stages of 64 k: one thread copies each stage's weights (128 rows of 32 bytes, 32-byte
// swizzle) and half of its activations (128 rows of 128 bytes, 128-byte swizzle), multicast to both CTAs, with bulk
// tensor copies, and each of its threads decodes its weight row's absmax for the stage (loaded a stage ahead) into
// shared memory; a stage completes on its `full` mbarrier. Warpgroups 1 and 2 dequantize rows 0-63 and 64-127 of the
// tile into the A fragments of the kernel above (through value tables in registers, not the shared code-pair table)
// and multiply them, and release a stage on the `empty` mbarrier of both CTAs once its multiplies are done.
constexpr int kWsThreads = 384;
constexpr int kWsCluster = 2;
constexpr int kWsTileRows = 128;
constexpr int kWsBN = 256;
constexpr int kWsWeightStageBytes = kWsTileRows * kStageK / 2;
constexpr int kWsScaleStageBytes = kWsTileRows * 4;
constexpr int kWsStageBytes = activation_stage_bytes<kWsBN>() + kWsWeightStageBytes + kWsScaleStageBytes;
// nested code, 2 mbarriers a stage (at most 8 stages), room to align the stages
constexpr int kWsFixedBytes = 256 * 4 + 16 * 8 + 1024;
constexpr int kWsStages = (kSmemBytes - kWsFixedBytes) / kWsStageBytes;
static_assert(kWsStages >= 3 && kWsStages <= 8, "the ring's mbarriers");
constexpr int kWsSmemBytes = kWsFixedBytes + kWsStages * kWsStageBytes;

template <typename T>
__global__ void __launch_bounds__(kWsThreads, 1)
    gemm_4bit_ws_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                        const WgmmaParams p, int groups) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = kWsBN, kStages = kWsStages, kABytes = activation_stage_bytes<BN>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s_ncode = reinterpret_cast<float*>(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(s_ncode + 256);
  uint64_t* empty = full + kStages;
  unsigned char* after = reinterpret_cast<unsigned char*>(empty + kStages);
  unsigned char* a_stages = after + ((1024 - (smem_addr(after) & 1023)) & 1023);
  unsigned char* w_stages = a_stages + kStages * kABytes;  // [stage][row][32 bytes], 16-byte halves swizzled
  float* s_scales = reinterpret_cast<float*>(w_stages + kStages * kWsWeightStageBytes);  // [stage][row]
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid < 256) s_ncode[tid] = p.nested ? __ldg(p.nested_code + tid) : 0.0f;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full + s, 1 + 128);  // the copies' arrival and each copier thread's absmax
      mbarrier_init(empty + s, 8 * kWsCluster);  // each multiplying warp of the cluster
    }
    mbarrier_init_fence();
  }
  cluster_sync();
  // The cluster walks groups of kWsCluster weight tiles with one A tile; a CTA takes the group's tile of its rank (past
  // the weight's rows where their tiles are odd: zeros, not stored).
  const int rank = cluster_rank();
  auto tile_origin = [&](int group, int& a0, int& n0) {
    a0 = (group % p.a_tiles) * kWsBN;
    n0 = ((group / p.a_tiles) * kWsCluster + rank) * kWsTileRows;
  };
  const int n_stages = p.K / kStageK;
  uint32_t it = 0;  // stages of earlier tiles: stage s of the tile is the ring's it + s

  if (tid < 128) {  // the copier
    registers_decrease<40>();
    const float offset = p.nested ? __ldg(p.nested_offset) : 0.0f;
    for (int group = cluster_index(); group < groups; group += cluster_count(), it += n_stages) {
      int a0, n0;
      tile_origin(group, a0, n0);
      const int64_t first = int64_t(min(n0 + tid, p.N - 1)) * p.K;  // this thread's weight row
      // Stage s's absmax of the row: its code and nested scale, or its scale (loaded a stage ahead of its use).
      auto load = [&](int s, uint32_t& q, float& scale) {
        const int64_t blk = (first + int64_t(s) * kStageK) >> p.log2_block;
        q = p.nested ? __ldg(p.absmax_q + blk) : 0;
        scale = p.nested ? __ldg(p.nested_absmax + (blk >> p.log2_nested)) : __ldg(p.absmax + blk);
      };
      uint32_t q;
      float scale;
      load(0, q, scale);
      for (int s = 0; s < n_stages; ++s) {
        const float am = p.nested ? __fadd_rn(__fmul_rn(s_ncode[q], scale), offset) : scale;
        if (s + 1 < n_stages) load(s + 1, q, scale);
        const uint32_t slot = (it + s) % kStages;
        mbarrier_wait(empty + slot, ((it + s) / kStages & 1) ^ 1);  // both CTAs are done with the slot
        if (tid == 0) {
          mbarrier_expect_bytes(full + slot, kABytes + kWsWeightStageBytes);
          tma_load_2d_multicast(a_stages + slot * kABytes + rank * (kABytes / kWsCluster), &a_map, s * kStageK,
                                a0 + rank * (BN / kWsCluster), full + slot, (1 << kWsCluster) - 1);
          tma_load_2d(w_stages + slot * kWsWeightStageBytes, &w_map, s * kStageK / 2, n0, full + slot);
        }
        s_scales[slot * kWsTileRows + tid] = am;
        mbarrier_arrive(full + slot);
      }
    }
  } else {  // the multiplying warpgroups
    registers_increase<232>();
    const int warp = (tid >> 5) - 4, t = lane & 3;
    const int r0 = 16 * warp + (lane >> 2);  // rows r0 and r0 + 8 of the tile
    const uint32_t pick = t | (t + 4) << 4;  // bytes t and 4 + t of two words
    float code[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) code[i] = p.fp4 ? kFP4Code[i] : kNF4Code[i];
    // Waits for stage s of the tile, then dequantizes its A fragments (the layout of the kernel above): each lane of a
    // quad loads its rows' 16-byte halves and picks its bytes, and looks the weights up in tables of the row's 16
    // values built in registers (table lookups in shared memory would compete with the multiplies' reads). The halves
    // are swapped in rows 4-7 of every 8 (the 32-byte swizzle), so a warp's 8 rows hit distinct banks.
    auto dequantize = [&](int s, uint32_t (&frag)[4][4]) {
      const uint32_t slot = (it + s) % kStages;
      mbarrier_wait(full + slot, (it + s) / kStages & 1);
      const unsigned char* ws = w_stages + slot * kWsWeightStageBytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
        uint32_t lo[4], hi[4];
        value_tables<T>(code, s_scales[slot * kWsTileRows + r], lo, hi);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const uint4 v = *reinterpret_cast<const uint4*>(ws + r * 32 + ((u ^ ((r >> 2) & 1)) << 4));
          look_up_bytes(__byte_perm(__byte_perm(v.x, v.y, pick), __byte_perm(v.z, v.w, pick), 0x5410), lo, hi, h, u,
                        frag);
        }
      }
    };
    auto release = [&](int s) {
      if (lane < kWsCluster) mbarrier_arrive_cluster(empty + (it + s) % kStages, lane);
    };
    const uint64_t desc0 = swizzle128_desc(smem_addr(a_stages));
    float acc[BN / 2];
    uint32_t fa[4][4], fb[4][4];
    for (int group = cluster_index(); group < groups; group += cluster_count(), it += n_stages) {
      int a0, n0;
      tile_origin(group, a0, n0);
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
      // Stage s: multiply `cur`; once stage s - 1's multiplies are done, release its buffers and dequantize stage
      // s + 1 into `next` (its fragments) while the tensor cores run.
      auto stage = [&](int s, const uint32_t (&cur)[4][4], uint32_t (&next)[4][4]) {
        multiply_stage<T, BN>(acc, cur, desc0 + (it + s) % kStages * (kABytes >> 4));
        wgmma_wait<1>();
        if (s > 0) release(s - 1);
        if (s + 1 < n_stages) dequantize(s + 1, next);
      };
      dequantize(0, fa);
      for (int s = 0; s < n_stages; s += 2) {
        stage(s, fa, fb);
        if (s + 1 < n_stages) stage(s + 1, fb, fa);
      }
      finish_multiplies<BN>(acc);
      release(n_stages - 1);
      store_tile<T, BN>(p, acc, n0 + r0, a0, t);
    }
  }
  cluster_sync();  // the other CTA no longer arrives on this one's barriers
#endif
}

template <typename T>
void launch_ws(const CUtensorMap& a, const CUtensorMap& w, const WgmmaParams& p, int groups) {
  launch_persistent_clusters<gemm_4bit_ws_kernel<T>>(kWsCluster, groups, kWsThreads, kWsSmemBytes, a, w, p, groups);
}

template <typename T, int BN, int WG>
void launch(const WgmmaParams& p, int64_t w_tiles) {
  constexpr int smem = smem_bytes<BN, WG>();
  raise_smem_limit<gemm_4bit_wgmma_kernel<T, BN, WG>>(smem);
  gemm_4bit_wgmma_kernel<T, BN, WG>
      <<<static_cast<unsigned>(w_tiles * p.a_tiles), threads<WG>(), smem, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Measured (H200, 8192x28672): 1.05-1.29x faster than dequantize + cuBLAS at m = 48-128, slower at 192 and 512.
constexpr int kMaxMDefault = 128;
// Measured (H200): the warp-specialized kernel 1.3-1.5x faster than dequantize + cuBLAS at m = 192-256 (8192x28672,
// 4096x14336), 0.94-0.96x at m = 512.
constexpr int kWsMaxMDefault = 256;

// Rows of A up to which the kernel runs (above: dequantize + cuBLAS).
int wgmma_max_m() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_WGMMA_MAX_M", INT_MIN, INT_MAX, kMaxMDefault);
  return value;
}

// Tuning override of the tiles below which the kernel does not run (-1: the rule of `fills_gpu`).
int forced_min_tiles() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_WGMMA_MIN_TILES", 0, INT_MAX, -1);
  return value;
}

// Tuning override of the warpgroups a CTA of BN = 64 (2 or 4; 0: the rule in gemm_4bit_wgmma).
int forced_wg() {
  static const int value = [] {
    const int v = env_override("TORCHLOWBIT_GEMM4BIT_WGMMA_WG", 2, 4, 0);
    TORCH_CHECK_VALUE(v != 3,
                      "environment variable TORCHLOWBIT_GEMM4BIT_WGMMA_WG must be 2 or 4 (or 0: the default), got 3");
    return v;
  }();
  return value;
}

// One tile a CTA and one CTA an SM: a grid whose last wave leaves many SMs idle loses to dequantize + cuBLAS
// (H200, m = 64-128, 128-row tiles: 8192x28672, 224 tiles, 1.1-1.3x faster than dequantize + cuBLAS; 4096x4096,
// 32 tiles, 2.2-2.6x slower). Runs where the waves keep at least 80% of the SMs busy.
bool fills_gpu(int64_t tiles) {
  const int forced = forced_min_tiles();
  if (forced >= 0) return tiles >= forced;
  const int64_t sms = multiprocessor_count();
  return 5 * tiles >= 4 * ceil_div(tiles, sms) * sms;
}

// Rows of A up to which the warp-specialized kernel runs where wgmma_max_m() ends (above: dequantize + cuBLAS).
int ws_max_m() {
  static const int value = env_override("TORCHLOWBIT_GEMM4BIT_WS_MAX_M", INT_MIN, INT_MAX, kWsMaxMDefault);
  return value;
}

// The warp-specialized kernel for p (its A and weight fields set) where it applies (A's rows and the packed weight's
// are 16-byte aligned, whole multiples of 16 bytes as K % 64 == 0) and its tiles fill the GPU.
bool gemm_4bit_ws(const at::Tensor& A2, WgmmaParams& p) {
  const int64_t M = A2.size(0);
  if (reinterpret_cast<uintptr_t>(p.A) % 16 != 0 || reinterpret_cast<uintptr_t>(p.packed) % 16 != 0 ||
      A2.stride(0) != p.K) {
    return false;
  }
  p.a_tiles = static_cast<int>(ceil_div(M, kWsBN));
  const int64_t w_tiles = ceil_div(p.N, kWsTileRows), groups = ceil_div(w_tiles, kWsCluster) * p.a_tiles;
  if (groups >= INT_MAX || !fills_gpu(w_tiles * p.a_tiles)) return false;
  const CUtensorMap a = tile_map_2d(p.A, CU_TENSOR_MAP_DATA_TYPE_UINT16, M, p.K, 2 * int64_t(p.K),
                                    kWsBN / kWsCluster, kStageK, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap w = tile_map_2d(p.packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.N, p.K / 2, p.K / 2, kWsTileRows,
                                    kStageK / 2, CU_TENSOR_MAP_SWIZZLE_32B);
  dispatch_float(A2.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) launch_ws<T>(a, w, p, static_cast<int>(groups));
  });
  return true;
}

}  // namespace

bool gemm_4bit_wgmma(const at::Tensor& A2, const at::Tensor& packed, const at::Tensor& absmax, int log2_block,
                     int fp4, const at::Tensor* nested_absmax, const at::Tensor* nested_code,
                     const at::Tensor* nested_offset, int log2_nested, const at::Tensor* bias, int64_t N, int64_t K,
                     at::Tensor& out2) {
  const at::ScalarType dtype = A2.scalar_type();
  if (dtype == at::kFloat || K % kStageK != 0 || log2_block < 6 || K >= (int64_t(1) << 30) ||
      N >= (int64_t(1) << 31) || A2.size(0) >= (int64_t(1) << 31) || !sm90a_device()) {
    return false;
  }
  WgmmaParams p{};
  fill_weight(p, packed, absmax, log2_block, fp4, nested_absmax, nested_code, nested_offset, log2_nested, bias, N, K);
  p.A = A2.data_ptr();
  p.out = out2.data_ptr();
  p.m = static_cast<int>(A2.size(0));
  if (A2.size(0) > wgmma_max_m()) return A2.size(0) <= ws_max_m() && gemm_4bit_ws(A2, p);
  if (nested_absmax != nullptr && reinterpret_cast<uintptr_t>(absmax.data_ptr()) % 4 != 0) return false;  // word copies
  // BN: 64 rows of A up to 64, else 128 or 256 (256 unless 128 wastes fewer rows of A). With BN = 64, four
  // warpgroups (256 weight rows a tile: each stage's activations serve twice the weights) where those tiles fill
  // the GPU, else two; larger BN leaves registers for two.
  const int64_t M = A2.size(0);
  const int bn = M <= 64 ? 64 : ceil_div(M, 256) * 256 <= ceil_div(M, 128) * 128 ? 256 : 128;
  p.a_tiles = static_cast<int>(ceil_div(M, bn));
  const bool quad_fills = fills_gpu(ceil_div(N, tile_rows(4)) * p.a_tiles);
  const int wg = bn > 64 ? 2 : forced_wg() != 0 ? forced_wg() : quad_fills ? 4 : 2;
  const int64_t w_tiles = ceil_div(N, tile_rows(wg));
  if (w_tiles * p.a_tiles >= INT_MAX || !fills_gpu(w_tiles * p.a_tiles)) return false;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (bn == 256) {
        launch<T, 256, 2>(p, w_tiles);
      } else if (bn == 128) {
        launch<T, 128, 2>(p, w_tiles);
      } else if (wg == 4) {
        launch<T, 64, 4>(p, w_tiles);
      } else {
        launch<T, 64, 2>(p, w_tiles);
      }
    }
  });
  return true;
}

}  // namespace lowbit
