// The scaled int8 matmul for many rows on Hopper, one kernel (sm_90a): out = ((A @ B.T) * row_stats * col_stats) /
// 127**2 (+ bias) (+ LLM.int8's outlier columns), A (rows, k) and B (n, k) int8, the epilogue of int8.h applied to the
// int32 accumulators in registers (cuBLAS' int8 GEMM wrote them to memory for a second kernel to read back).
//   - Persistent clusters of two CTAs of three warpgroups walk pairs of tiles of 128 rows of A x 256 rows of B that
//     share their B tile (or, for few rows of A, their A tile), A's tiles adjacent so that the clusters running
//     together share B's rows in L2. Warpgroup 0 is the copier: one thread issues bulk tensor copies (TMA) of each
//     stage's 128 k of its CTA's tiles (128-byte rows, 128-byte swizzle; rows and k past the matrices arrive as zeros),
//     the shared tile half by each CTA and multicast to both, into a ring of kStages, each stage completing on its
//     `full` mbarrier. Warpgroups 1 and 2 multiply rows 0-63 and 64-127 of the tile: 4 wgmma m64n256k32 a stage
//     (s8 x s8 into 128 int32 registers a thread), and release a stage on the `empty` mbarrier of both CTAs once the
//     next stage's multiplies are issued and its own are done.
//   - setmaxnreg moves registers from the copier (40) to the multiplying warpgroups (232).
//   - The epilogue takes the tile's 256 columns 64 at a time, while the copier fills the ring for the next tile. The
//     tile's column scales, biases and row scales are copied to shared memory while it multiplies: loaded from global
//     memory in the epilogue, each waited for with the tensor cores idle: half the multiplying warps' stall samples
//     at 4096x4096, m = 4096, where the op took 0.163 ms against 0.131 with the copies (H200).
//   - Outlier columns (a count on the device): the first kGathered have their dequantized weights and activations
//     gathered once a call into a float32 buffer (gather_outliers_kernel), and each tile copies its part into shared
//     memory with cp.async while it multiplies, so the epilogue finds them there. The rest (rare) are staged in the
//     epilogue, kOutlierBatch at a time. Their products are summed in the order of int8_matmul.cu's epilogue, so the
//     results are bit-identical to it. (Staged in the epilogue alone, 8 outlier columns cost 40% of the kernel's
//     time at 8192x28672, m = 4096: the epilogue waited on global memory with the tensor cores idle.)
#include "hopper.h"
#include "int8.h"

#include <climits>
#include <type_traits>

namespace lowbit {
namespace {

constexpr int kBM = 128;  // rows of A a tile: two multiplying warpgroups of 64 (wgmma's M)
constexpr int kBN = 256;  // rows of B a tile, the output's columns: wgmma's N
constexpr int kBK = 128;  // k a stage: 128 bytes of a row, the swizzle's width
constexpr int kStages = 4;
// CTAs of a cluster: they take two adjacent tiles that share their A or their B tile, and each copies half of the
// shared tile to both (multicast), so its rows are read from L2 once for two tiles.
constexpr int kCluster = 2;
constexpr int kThreads = 384;  // warpgroup 0 copies, 1 and 2 multiply
constexpr int kMultiplyThreads = 256;
constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK, kStageBytes = kABytes + kBBytes;
constexpr int kMinRowsDefault = 64;
constexpr int kChunkCols = 64;  // columns the epilogue takes at a time
constexpr int kGathered = 16;   // outlier columns gathered a call and copied to each tile while it multiplies
constexpr int kGatheredTile = kBN + kBM;  // a tile's floats of one gathered column: weights, then activations
constexpr int kOutlierBatch = 8;  // further outlier columns, staged in the epilogue at a time
constexpr int kStagedOutliers = kOutlierBatch * (kChunkCols + kBM);
static_assert(kOutlierBatch * kChunkCols % kMultiplyThreads == 0 && kStagedOutliers % kMultiplyThreads == 0,
              "every thread stages the same number of weights and of activations");
constexpr int kTileStats = 2 * kBN + kBM;  // a tile's column scales, biases and row scales
// 1024 to align the stages, the ring, its barriers, the gathered and the staged outlier columns, the tile's scales
constexpr int kSmemBytes =
    1024 + kStages * kStageBytes + 2 * kStages * 8 + (kGathered * kGatheredTile + kStagedOutliers + kTileStats) * 4;
static_assert(kSmemBytes <= 227 * 1024, "a CTA's shared memory on sm_90");

// The first kGathered outlier columns as float32, column j at j * stride: the dequantized weight of each of the n
// output columns, then (at w_stride, n rounded up to whole tiles) the activation of each row; zero past count, n and
// the rows.
struct GatheredOutliers {
  const float* data;
  int64_t stride;
  int64_t w_stride;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define LOWBIT_R4(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3])
#define LOWBIT_R16(i) LOWBIT_R4(i), LOWBIT_R4(i + 4), LOWBIT_R4(i + 8), LOWBIT_R4(i + 12)
#define LOWBIT_R64(i) LOWBIT_R16(i), LOWBIT_R16(i + 16), LOWBIT_R16(i + 32), LOWBIT_R16(i + 48)
// d (64 x 256 int32 of the warpgroup) = (accumulate ? d : 0) + a (64 x 32 at a_desc) * b (256 x 32 at b_desc).T.
// Accumulator 4 j + 2 h + e of a thread (lane 4 g + t of warp w of the warpgroup): row 16 w + g + 8 h, column
// 8 j + 2 t + e.
__device__ __forceinline__ void wgmma_s8(int32_t (&d)[128], uint64_t a_desc, uint64_t b_desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, "
      "%67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, "
      "%89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, "
      "%109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
      "%127}, %128, %129, p;\n}\n"
      : LOWBIT_R64(0), LOWBIT_R64(64)
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}
#undef LOWBIT_R64
#undef LOWBIT_R16
#undef LOWBIT_R4

// Two adjacent outputs (row, col) and (row, col + 1) from their accumulators, their columns' scales cs and biases bs,
// plus the outlier sums s when there are outliers; paired stores where the row length n is even.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* out, const EpilogueParams& e, int64_t row, int64_t col, float rs,
                                           const float* cs, const float* bs, int32_t a0, int32_t a1, float s0,
                                           float s1, bool outliers) {
  if (row >= e.rows || col >= e.n) return;
  OutT* p = out + row * e.n + col;
  float v0 = scaled(e, rs, cs[0], bs[0], a0);
  if (outliers) v0 = __fadd_rn(v0, s0);
  if (col + 1 >= e.n) {
    Elem<OutT>::store1(p, v0);
    return;
  }
  float v1 = scaled(e, rs, cs[1], bs[1], a1);
  if (outliers) v1 = __fadd_rn(v1, s1);
  if (e.n % 2 != 0) {
    Elem<OutT>::store1(p, v0);
    Elem<OutT>::store1(p + 1, v1);
  } else if constexpr (std::is_same_v<OutT, float>) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else {
    *reinterpret_cast<uint32_t*>(p) = Elem<OutT>::pack2(v0, v1);
  }
}

// Outlier columns [first, first + batch) of the tile: their dequantized weights in the chunk's columns from c0
// (w[j][c]) and the unquantized activations of the tile's rows from m0 (after them, x[j][r]), zero past the
// matrices. All loads of a thread are issued before its stores, so their latencies overlap.
template <typename OutT>
__device__ __forceinline__ void stage_outliers(const EpilogueParams& e, float* w, int64_t m0, int64_t c0, int first,
                                               int batch, int mtid) {
  constexpr int kPerThread = kStagedOutliers / kMultiplyThreads;
  constexpr int kWeights = kOutlierBatch * kChunkCols / kMultiplyThreads;  // the first kWeights are weights
  float v[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = mtid + u * kMultiplyThreads;
    const int j = u < kWeights ? i / kChunkCols : (i - kOutlierBatch * kChunkCols) / kBM;
    v[u] = 0.0f;
    if (j >= batch) continue;
    const int32_t column = __ldg(e.outlier_index + first + j);
    if (u < kWeights) {
      const int64_t col = c0 + i % kChunkCols;
      if (col < e.n) v[u] = outlier_weight(e, col, column);
    } else {
      const int64_t row = m0 + (i - kOutlierBatch * kChunkCols) % kBM;
      if (row < e.rows) v[u] = outlier_activation<OutT>(e, row, column);
    }
  }
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) w[mtid + u * kMultiplyThreads] = v[u];
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Not in sm_90a passes: int8_matmul_wgmma launches it only on an sm_90a device.
template <typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    int8_wgmma_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
                      OutT* __restrict__ out, const EpilogueParams e, const GatheredOutliers gathered, int m_groups,
                      int groups, bool pair_m) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* stages = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  float* gathered_s = reinterpret_cast<float*>(empty + kStages);   // [kGathered][kBN weights, kBM activations]
  float* outlier_w = gathered_s + kGathered * kGatheredTile;       // [kOutlierBatch][kChunkCols] weights
  float* outlier_x = outlier_w + kOutlierBatch * kChunkCols;       // [kOutlierBatch][kBM] activations
  float* tile_stats = outlier_x + kOutlierBatch * kBM;              // [kBN] column scales, [kBN] biases, [kBM] rows
  const int k_stages = static_cast<int>((e.k + kBK - 1) / kBK);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full + s, 1);
      mbarrier_init(empty + s, kCluster * kMultiplyThreads / 32);  // each multiplying warp of the cluster arrives
    }
    mbarrier_init_fence();
  }
  cluster_sync();
  // Tiles: the cluster walks groups of kCluster tiles, adjacent along A's rows (pair_m: one B tile) or along B's,
  // and a CTA takes the group's tile of its rank (past the matrix where their tiles are odd: zeros, not stored).
  const int rank = cluster_rank();
  auto tile_origin = [&](int group, int& m0, int& n0) {
    m0 = ((group % m_groups) * (pair_m ? kCluster : 1) + (pair_m ? rank : 0)) * kBM;
    n0 = ((group / m_groups) * (pair_m ? 1 : kCluster) + (pair_m ? 0 : rank)) * kBN;
  };

  if (threadIdx.x < kThreads - kMultiplyThreads) {  // the copier
    registers_decrease<40>();
    if (threadIdx.x == 0) {
      int slot = 0;
      uint32_t phase = 0;
      for (int group = cluster_index(); group < groups; group += cluster_count()) {
        int m0, n0;
        tile_origin(group, m0, n0);
        for (int s = 0; s < k_stages; ++s) {
          mbarrier_wait(empty + slot, phase ^ 1);  // both CTAs are done with the slot
          mbarrier_expect_bytes(full + slot, kStageBytes);
          unsigned char* stage = stages + slot * kStageBytes;
          constexpr uint16_t kAll = (1 << kCluster) - 1;
          if (pair_m) {
            tma_load_2d(stage, &a_map, s * kBK, m0, full + slot);
            tma_load_2d_multicast(stage + kABytes + rank * (kBBytes / kCluster), &b_map, s * kBK,
                                  n0 + rank * (kBN / kCluster), full + slot, kAll);
          } else {
            tma_load_2d_multicast(stage + rank * (kABytes / kCluster), &a_map, s * kBK, m0 + rank * (kBM / kCluster),
                                  full + slot, kAll);
            tma_load_2d(stage + kABytes, &b_map, s * kBK, n0, full + slot);
          }
          if (++slot == kStages) slot = 0, phase ^= 1;
        }
      }
    }
  } else {  // the multiplying warpgroups
    registers_increase<232>();
    const int wg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, mtid = threadIdx.x - (kThreads - kMultiplyThreads);
    const int count = e.outlier_count ? *e.outlier_count : 0;
    const int n_gathered = count < kGathered ? count : kGathered;
    const uint64_t a_desc = swizzle128_desc(smem_addr(stages + wg * 64 * kBK));
    const uint64_t b_desc = swizzle128_desc(smem_addr(stages + kABytes));
    int slot = 0;
    uint32_t phase = 0;
    int32_t d[128];
    for (int group = cluster_index(); group < groups; group += cluster_count()) {
      int m0, n0;
      tile_origin(group, m0, n0);
      // Copied while the tile multiplies, waited for in the epilogue (whose global loads would each wait with the
      // tensor cores idle): the tile's column scales, biases and row scales, and its part of the gathered columns.
      for (int i = mtid; i < kTileStats; i += kMultiplyThreads) {
        const float* src = i < kBN ? e.col_stats : i < 2 * kBN ? e.bias : e.row_stats;
        const int64_t at = i < 2 * kBN ? n0 + i % kBN : m0 + i - 2 * kBN;
        const bool valid = src != nullptr && at < (i < 2 * kBN ? e.n : e.rows);
        cp_async4(smem_addr(tile_stats + i), valid ? src + at : e.col_stats, valid);
      }
      for (int i = mtid; i < n_gathered * kGatheredTile / 4; i += kMultiplyThreads) {
        const int j = i / (kGatheredTile / 4), c = 4 * (i % (kGatheredTile / 4));
        const float* src = gathered.data + j * gathered.stride + (c < kBN ? n0 + c : gathered.w_stride + m0 + c - kBN);
        cp_async16(smem_addr(gathered_s + j * kGatheredTile + c), src);
      }
      cp_async_commit();
      int previous = 0;
      for (int s = 0; s < k_stages; ++s) {
        mbarrier_wait(full + slot, phase);
        wgmma_fence();
        const uint64_t at = slot * (kStageBytes >> 4);  // the descriptors' address field, in 16 bytes
#pragma unroll
        for (int kk = 0; kk < kBK / 32; ++kk) wgmma_s8(d, a_desc + at + 2 * kk, b_desc + at + 2 * kk, s > 0 || kk > 0);
        wgmma_commit();
        wgmma_wait<1>();  // the previous stage's multiplies are done: release its buffers
        if (s > 0 && lane < kCluster) mbarrier_arrive_cluster(empty + previous, lane);
        previous = slot;
        if (++slot == kStages) slot = 0, phase ^= 1;
      }
      wgmma_wait<0>();
      if (lane < kCluster) mbarrier_arrive_cluster(empty + previous, lane);
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_operand(d[i]);

      const int r0 = 64 * wg + 16 * warp + g;  // rows r0 and r0 + 8 of the tile
      const int64_t row0 = m0 + r0, row1 = row0 + 8;
      cp_async_wait<0>();
      named_barrier<1, kMultiplyThreads>();  // every thread's copies of the scales and gathered columns have landed
      const float rs0 = tile_stats[2 * kBN + r0], rs1 = tile_stats[2 * kBN + r0 + 8];
      // Outlier sums, outlier column j of the weights w (kChunkCols floats, this chunk's) and activations x (kBM).
      auto add_outliers = [&](float (&s)[kChunkCols / 2], const float* w, const float* x) {
        const float a0 = x[r0], a1 = x[r0 + 8];
#pragma unroll
        for (int jj = 0; jj < kChunkCols / 8; ++jj) {
          const float2 wj = *reinterpret_cast<const float2*>(w + 8 * jj + 2 * t);
          s[4 * jj] = fmaf(a0, wj.x, s[4 * jj]), s[4 * jj + 1] = fmaf(a0, wj.y, s[4 * jj + 1]);
          s[4 * jj + 2] = fmaf(a1, wj.x, s[4 * jj + 2]), s[4 * jj + 3] = fmaf(a1, wj.y, s[4 * jj + 3]);
        }
      };
#pragma unroll
      for (int q = 0; q < kBN / kChunkCols; ++q) {
        const int64_t c0 = n0 + q * kChunkCols;
        float s[kChunkCols / 2];
#pragma unroll
        for (int i = 0; i < kChunkCols / 2; ++i) s[i] = 0.0f;
        for (int j = 0; j < n_gathered; ++j) {
          add_outliers(s, gathered_s + j * kGatheredTile + q * kChunkCols, gathered_s + j * kGatheredTile + kBN);
        }
        for (int first = kGathered; first < count; first += kOutlierBatch) {
          const int batch = count - first < kOutlierBatch ? count - first : kOutlierBatch;
          named_barrier<1, kMultiplyThreads>();  // the previous batch is no longer read
          stage_outliers<OutT>(e, outlier_w, m0, c0, first, batch, mtid);
          named_barrier<1, kMultiplyThreads>();
          for (int j = 0; j < batch; ++j) add_outliers(s, outlier_w + j * kChunkCols, outlier_x + j * kBM);
        }
#pragma unroll
        for (int jj = 0; jj < kChunkCols / 8; ++jj) {
          const int i = 4 * (q * kChunkCols / 8 + jj), c = q * kChunkCols + 8 * jj + 2 * t;
          const float *cs = tile_stats + c, *bs = tile_stats + kBN + c;
          store_pair(out, e, row0, n0 + c, rs0, cs, bs, d[i], d[i + 1], s[4 * jj], s[4 * jj + 1], count > 0);
          store_pair(out, e, row1, n0 + c, rs1, cs, bs, d[i + 2], d[i + 3], s[4 * jj + 2], s[4 * jj + 3], count > 0);
        }
      }
      named_barrier<1, kMultiplyThreads>();  // read by all before the next tile's copies
    }
  }
  cluster_sync();  // the other CTA no longer arrives on this one's barriers
#endif
}

// GatheredOutliers of A's outlier columns (A of the output's float type): one thread an element.
template <typename OutT>
__global__ void gather_outliers_kernel(const EpilogueParams e, float* __restrict__ data, int64_t stride,
                                       int64_t w_stride) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= kGathered * stride) return;
  const int j = static_cast<int>(i / stride);
  const int64_t p = i % stride;
  float v = 0.0f;
  if (j < *e.outlier_count) {
    const int32_t column = __ldg(e.outlier_index + j);
    if (p < e.n) {
      v = outlier_weight(e, p, column);
    } else if (p >= w_stride && p - w_stride < e.rows) {
      v = outlier_activation<OutT>(e, p - w_stride, column);
    }
  }
  data[i] = v;
}

// The tensor map of an int8 matrix (rows, k) with 16-byte aligned rows, copied in boxes of box_rows x kBK bytes with
// the 128-byte swizzle that the wgmma descriptors expect.
CUtensorMap int8_tile_map(const at::Tensor& t, int box_rows) {
  return tile_map_2d(t.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, t.size(0), t.size(1), t.stride(0), box_rows, kBK,
                     CU_TENSOR_MAP_SWIZZLE_128B);
}

// Rows of A from which the kernel runs where its tiles cover enough SMs (fewer rows: cuBLAS and the epilogue kernel).
int min_rows() {
  static const int value = env_override("TORCHLOWBIT_INT8_WGMMA_MIN_M", 0, INT_MAX, kMinRowsDefault);
  return value;
}

// One tile a CTA at a time: with tiles for fewer than 40% of the SMs cuBLAS and the epilogue kernel are faster at
// threshold 0 (H200, int8_mixed_linear, ms, kernel / cuBLAS: 4096x4096 m = 256, 32 tiles, 0.0317 / 0.0271; m = 512,
// 64 tiles, 0.0327 / 0.0402; 4096x14336 m = 64 and 128, 56 tiles, 0.0332 / 0.0369 and 0.0348 / 0.0418).
bool covers_enough_sms(int64_t tiles) { return 5 * tiles >= 2 * multiprocessor_count(); }

template <typename OutT>
void launch(const CUtensorMap& a, const CUtensorMap& b, OutT* out, const EpilogueParams& e, int m_groups, int groups,
            bool pair_m) {
  GatheredOutliers gathered{nullptr, 0, 0};
  at::Tensor buffer;
  if (e.outlier_count != nullptr) {  // freed after the launches: the allocator reuses it only for later work
    gathered.w_stride = ceil_div(e.n, kCluster * kBN) * kCluster * kBN;
    gathered.stride = gathered.w_stride + ceil_div(e.rows, kCluster * kBM) * kCluster * kBM;
    buffer = at::empty({kGathered * gathered.stride},
                       at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
    gathered.data = buffer.data_ptr<float>();
    gather_outliers_kernel<OutT><<<static_cast<unsigned>(ceil_div(kGathered * gathered.stride, 256)), 256, 0,
                                   current_stream()>>>(e, buffer.data_ptr<float>(), gathered.stride, gathered.w_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_persistent_clusters<int8_wgmma_kernel<OutT>>(kCluster, groups, kThreads, kSmemBytes, a, b, out, e, gathered,
                                                     m_groups, groups, pair_m);
}

}  // namespace

bool int8_matmul_wgmma(const at::Tensor& A, const at::Tensor& B, void* out, at::ScalarType dtype,
                       const EpilogueParams& e) {
  const int64_t rows = A.size(0), k = A.size(1), n = B.size(0);
  if (rows < min_rows() || k == 0 || k % 16 != 0 || rows >= INT_MAX || n >= INT_MAX || !sm90a_device()) return false;
  const int64_t m_tiles = ceil_div(rows, kBM), tiles = m_tiles * ceil_div(n, kBN);
  if (tiles >= INT_MAX || !covers_enough_sms(tiles)) return false;
  // Pairs along A's rows share B's tile (32 of a stage's 48 KB) where few of the pairs' tiles fall past A's rows.
  const bool pair_m = m_tiles % kCluster == 0 || m_tiles >= 8;
  const CUtensorMap a = int8_tile_map(A, pair_m ? kBM : kBM / kCluster);
  const CUtensorMap b = int8_tile_map(B, pair_m ? kBN / kCluster : kBN);
  const int64_t m_groups = pair_m ? ceil_div(m_tiles, kCluster) : m_tiles;
  const int64_t groups = m_groups * (pair_m ? ceil_div(n, kBN) : ceil_div(n, kCluster * kBN));
  dispatch_float(dtype, [&](auto tag) {
    using OutT = decltype(tag);
    launch<OutT>(a, b, static_cast<OutT*>(out), e, static_cast<int>(m_groups), static_cast<int>(groups), pair_m);
  });
  return true;
}

}  // namespace lowbit
