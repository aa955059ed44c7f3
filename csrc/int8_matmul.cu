// CUDA kernels of lowbit::int8_linear_matmul, int8_mm_dequant and int8_scaled_mm (and the matmul of
// int8_mixed_linear), matching torchlowbit/ops/int8_matmul.py: exact int32 products, then the epilogue
// ((acc * row_stats) * col_stats) / 127**2 (+ bias) in float32, rounded once to the output dtype.
//
// Up to kGemvMaxRows rows: one fused kernel streams the weight once (dp4a, int32 accumulation) and applies
// the epilogue in registers. More rows (where dp4a would bound the time, not memory): on Hopper from
// TORCHLOWBIT_INT8_WGMMA_MIN_M rows (default 64), where its tiles cover 40% of the SMs, the wgmma kernel of
// int8_matmul_wgmma.cu, epilogue in registers; otherwise cuBLAS' int8 tensor-core GEMM (at::_int_mm, which
// needs more than 16 rows: fewer are padded) into int32, then one epilogue pass. LLM.int8's outlier columns
// are added in float32 by every epilogue, their weight columns staged in shared memory per tile.
#include "int8.h"

#include <torch/library.h>

#include <type_traits>

namespace lowbit {
namespace {

template <typename OutT>
__device__ __forceinline__ void store4(OutT* p, const float (&v)[4]) {
  if constexpr (std::is_same_v<OutT, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(Elem<OutT>::pack2(v[0], v[1]), Elem<OutT>::pack2(v[2], v[3]));
  }
}

// ---------------------------------------------------------------------------------------------------
// Few rows: a warp owns gemv_cols(MR) weight rows and MR activation rows; each lane streams 16-byte chunks
// of the weight rows (kGemvUnroll per row in flight) and multiplies them with the activation chunks. The
// activations are int8 rows, or (kQuantizeA) rows in the output's float type that every CTA quantizes into
// shared memory first, which saves the quantization kernel and its launch at threshold 0.

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvUnroll = 4;
constexpr int kGemvMaxRows = 4;
constexpr int kCublasMinRows = 17;

// Weight rows per warp: 2 for one or two activation rows (twice the CTAs, so no wave is left half empty)
constexpr int gemv_cols(int rows) { return rows <= 2 ? 2 : 4; }

__device__ __forceinline__ int32_t dot16(const uint4& a, const uint4& b, int32_t acc) {
  acc = __dp4a(static_cast<int>(a.x), static_cast<int>(b.x), acc);
  acc = __dp4a(static_cast<int>(a.y), static_cast<int>(b.y), acc);
  acc = __dp4a(static_cast<int>(a.z), static_cast<int>(b.z), acc);
  return __dp4a(static_cast<int>(a.w), static_cast<int>(b.w), acc);
}

template <typename OutT>
__device__ void store_result(OutT* out, const EpilogueParams& e, int64_t row, int64_t col, float row_stat,
                             int32_t acc) {
  if constexpr (std::is_same_v<OutT, int32_t>) {
    out[row * e.n + col] = acc;
  } else {
    float v = scaled(e, row_stat, col, acc);
    const int count = e.outlier_count ? *e.outlier_count : 0;
    if (count > 0) {
      const OutT* a = static_cast<const OutT*>(e.outlier_A) + row * e.k;
      float s = 0.0f;
      for (int j = 0; j < count; ++j) {
        const int32_t column = __ldg(e.outlier_index + j);
        s = fmaf(static_cast<float>(a[column]), outlier_weight(e, col, column), s);
      }
      v = __fadd_rn(v, s);
    }
    Elem<OutT>::store1(out + row * e.n + col, v);
  }
}

template <int MR, typename OutT, bool kQuantizeA>
__global__ void __launch_bounds__(kGemvThreads)
    int8_gemv_kernel(const void* __restrict__ A_in, const int8_t* __restrict__ B, OutT* __restrict__ out,
                     const EpilogueParams e) {
  static_assert(kGemvThreads == kRowThreads, "the CTA quantizes activation rows as quantize_row expects");
  constexpr int NR = gemv_cols(MR);
  const int lane = threadIdx.x & 31;
  const int64_t k = e.k;
  extern __shared__ __align__(16) int8_t staged[];  // kQuantizeA: (MR, k) int8
  __shared__ float staged_stats[MR];
  if constexpr (kQuantizeA) {  // one row group (launch_gemv's condition)
    for (int r = 0; r < MR && r < e.rows; ++r) {
      const float absmax = quantize_row(static_cast<const OutT*>(A_in) + r * k, k, 0.0f, staged + r * k, nullptr);
      if (threadIdx.x == 0) staged_stats[r] = absmax;
    }
    __syncthreads();
  }
  const int8_t* A = kQuantizeA ? staged : static_cast<const int8_t*>(A_in);
  const int64_t n0 = (int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * NR;
  if (n0 >= e.n) return;
  for (int64_t r0 = int64_t(blockIdx.y) * MR; r0 < e.rows; r0 += int64_t(gridDim.y) * MR) {
    int32_t acc[MR][NR];
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int j = 0; j < NR; ++j) acc[r][j] = 0;

    if (k % 16 == 0) {
      const int64_t chunks = k / 16;
      const uint4* a_rows = reinterpret_cast<const uint4*>(A + r0 * k);
      const uint4* b_rows = reinterpret_cast<const uint4*>(B + n0 * k);
      for (int64_t c = lane; c < chunks; c += 32 * kGemvUnroll) {
        uint4 b[kGemvUnroll][NR];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u)
#pragma unroll
          for (int j = 0; j < NR; ++j)
            b[u][j] = c + 32 * u < chunks && n0 + j < e.n ? __ldcs(b_rows + j * chunks + c + 32 * u)
                                                          : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
          if (c + 32 * u >= chunks) break;
#pragma unroll
          for (int r = 0; r < MR; ++r) {
            if (r0 + r >= e.rows) break;
            const uint4 a = kQuantizeA ? a_rows[r * chunks + c + 32 * u] : __ldg(a_rows + r * chunks + c + 32 * u);
#pragma unroll
            for (int j = 0; j < NR; ++j) acc[r][j] = dot16(a, b[u][j], acc[r][j]);
          }
        }
      }
    } else {  // rows not 16-byte aligned: byte loads
      for (int64_t c = lane; c < k; c += 32) {
        int32_t b[NR];
#pragma unroll
        for (int j = 0; j < NR; ++j) b[j] = n0 + j < e.n ? B[(n0 + j) * k + c] : 0;
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          if (r0 + r >= e.rows) break;
          const int32_t a = A[(r0 + r) * k + c];
#pragma unroll
          for (int j = 0; j < NR; ++j) acc[r][j] += a * b[j];
        }
      }
    }

#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int j = 0; j < NR; ++j)
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], offset);

    static_assert(MR * NR <= 32, "one lane per output");
    if (lane < MR * NR) {
      int32_t v = 0;
#pragma unroll
      for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int j = 0; j < NR; ++j)
          if (r * NR + j == lane) v = acc[r][j];
      const int64_t row = r0 + lane / NR, col = n0 + lane % NR;
      if (row < e.rows && col < e.n) {
        const float row_stat = kQuantizeA ? staged_stats[lane / NR] : e.row_stats ? __ldg(e.row_stats + row) : 0.0f;
        store_result(out, e, row, col, row_stat, v);
      }
    }
  }
}

int gemv_row_group(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : 4; }

// Whether the GEMV can quantize float activation rows itself: one row group, 16-byte rows in shared memory.
bool gemv_quantizes(int64_t rows, int64_t k) {
  return rows > 0 && rows <= kGemvMaxRows && k > 0 && k % 16 == 0 && gemv_row_group(rows) * k <= 48 * 1024;
}

// A: (rows, k) int8, or (kQuantizeA) in OutT, contiguous and 16-byte aligned.
template <bool kQuantizeA = false, typename OutT>
void launch_gemv(const at::Tensor& A, const at::Tensor& B, OutT* out, const EpilogueParams& e) {
  auto launch = [&](auto rows_tag) {
    constexpr int MR = decltype(rows_tag)::value;
    const dim3 grid(ceil_div(e.n, int64_t{kGemvWarps} * gemv_cols(MR)),
                    std::min<int64_t>(ceil_div(e.rows, MR), 65535));
    const size_t smem = kQuantizeA ? MR * e.k : 0;
    int8_gemv_kernel<MR, OutT, kQuantizeA>
        <<<grid, kGemvThreads, smem, current_stream()>>>(A.data_ptr(), B.data_ptr<int8_t>(), out, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (e.rows <= 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (e.rows <= 2) {
    launch(std::integral_constant<int, 2>{});
  } else {
    launch(std::integral_constant<int, 4>{});
  }
}

// ---------------------------------------------------------------------------------------------------
// Many rows: the epilogue over cuBLAS' int32 product. A CTA covers kEpiCols columns (4 per thread) and
// kEpiRows rows; the dequantized weight values of up to kEpiOutliers outlier columns sit in shared memory.

constexpr int kEpiThreads = 256;
constexpr int kEpiCols = 256;
constexpr int kEpiRowsPerStep = kEpiThreads / (kEpiCols / 4);
constexpr int kEpiRows = 64;
constexpr int kEpiOutliers = 32;

struct OutlierTile {
  float weight[kEpiOutliers][kEpiCols];
  int32_t column[kEpiOutliers];
};

// Outlier columns [first, first + count) of this CTA's columns into shared memory.
__device__ void stage_outliers(OutlierTile& tile, const EpilogueParams& e, int64_t col0, int first, int count) {
  for (int i = threadIdx.x; i < count * kEpiCols; i += kEpiThreads) {
    const int j = i / kEpiCols, c = i % kEpiCols;
    const int32_t column = __ldg(e.outlier_index + first + j);
    tile.weight[j][c] = col0 + c < e.n ? outlier_weight(e, col0 + c, column) : 0.0f;
    if (c == 0) tile.column[j] = column;
  }
  __syncthreads();
}

template <typename OutT>
__device__ __forceinline__ void add_outliers(const OutlierTile& tile, const EpilogueParams& e, int64_t row, int tx,
                                             int count, float (&s)[4]) {
  const OutT* a = static_cast<const OutT*>(e.outlier_A) + row * e.k;
  for (int j = 0; j < count; ++j) {
    const float x = static_cast<float>(a[tile.column[j]]);
    const float4 w = reinterpret_cast<const float4*>(tile.weight[j])[tx];
    s[0] = fmaf(x, w.x, s[0]), s[1] = fmaf(x, w.y, s[1]), s[2] = fmaf(x, w.z, s[2]), s[3] = fmaf(x, w.w, s[3]);
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kEpiThreads)
    int8_epilogue_kernel(const int32_t* __restrict__ C, OutT* __restrict__ out, const EpilogueParams e) {
  __shared__ OutlierTile tile;
  const int tx = threadIdx.x % (kEpiCols / 4), ty = threadIdx.x / (kEpiCols / 4);
  const int64_t col0 = int64_t(blockIdx.x) * kEpiCols, col = col0 + 4 * tx;
  const bool vectorized = e.n % 4 == 0;
  const int count = e.outlier_count ? *e.outlier_count : 0;
  const bool resident = count <= kEpiOutliers;
  if (count > 0 && resident) stage_outliers(tile, e, col0, 0, count);

  for (int64_t row0 = int64_t(blockIdx.y) * kEpiRows; row0 < e.rows; row0 += int64_t(gridDim.y) * kEpiRows) {
    for (int step = 0; step < kEpiRows / kEpiRowsPerStep; ++step) {  // uniform: the staging below syncs
      const int64_t row = row0 + step * kEpiRowsPerStep + ty;
      const bool active = row < e.rows && col < e.n;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (active) {
        const int32_t* c = C + row * e.n + col;
        const float rs = __ldg(e.row_stats + row);
        if (vectorized) {
          const int4 acc = __ldcs(reinterpret_cast<const int4*>(c));
          v[0] = scaled(e, rs, col, acc.x), v[1] = scaled(e, rs, col + 1, acc.y);
          v[2] = scaled(e, rs, col + 2, acc.z), v[3] = scaled(e, rs, col + 3, acc.w);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q)
            if (col + q < e.n) v[q] = scaled(e, rs, col + q, c[q]);
        }
      }
      if (count > 0) {
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int first = 0; first < count; first += kEpiOutliers) {
          const int batch = count - first < kEpiOutliers ? count - first : kEpiOutliers;
          if (!resident) {
            __syncthreads();  // the previous batch is no longer read
            stage_outliers(tile, e, col0, first, batch);
          }
          if (active) add_outliers<OutT>(tile, e, row, tx, batch, s);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = __fadd_rn(v[q], s[q]);
      }
      if (!active) continue;
      OutT* o = out + row * e.n + col;
      if (vectorized) {
        store4(o, v);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (col + q < e.n) Elem<OutT>::store1(o + q, v[q]);
      }
    }
  }
}

template <typename OutT>
void launch_epilogue(const at::Tensor& C, OutT* out, const EpilogueParams& e) {
  const dim3 grid(ceil_div(e.n, kEpiCols), std::min<int64_t>(ceil_div(e.rows, kEpiRows), 65535));
  int8_epilogue_kernel<OutT><<<grid, kEpiThreads, 0, current_stream()>>>(C.data_ptr<int32_t>(), out, e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool use_cublas(int64_t rows, int64_t k, int64_t n) { return rows > kGemvMaxRows && k > 0 && k % 8 == 0 && n % 8 == 0; }

// cuBLAS' int32 product of (rows, k) and (n, k) into out (rows, n); fewer than kCublasMinRows rows are padded
// with zero rows.
void int_mm(const at::Tensor& A, const at::Tensor& B, at::Tensor& out) {
  const int64_t rows = A.size(0);
  if (rows >= kCublasMinRows) {
    at::_int_mm_out(out, A, B.t());
    return;
  }
  const at::Tensor padded = at::constant_pad_nd(A, {0, 0, 0, kCublasMinRows - rows});
  out.copy_(at::_int_mm(padded, B.t()).narrow(0, 0, rows));
}

// The stats, bias and outliers of a (rows, k) x (n, k) product; the tensors must outlive the launch.
EpilogueParams epilogue_params(int64_t rows, int64_t n, int64_t k, const at::Tensor* row_stats,
                               const at::Tensor* col_stats, const std::optional<at::Tensor>& bias,
                               const OutlierColumns* outliers, const at::Tensor* B) {
  EpilogueParams e{rows, n, k, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (row_stats) e.row_stats = row_stats->data_ptr<float>();
  if (col_stats) e.col_stats = col_stats->data_ptr<float>();
  if (bias) e.bias = bias->data_ptr<float>();
  if (outliers) {
    e.outlier_A = outliers->A.data_ptr();
    e.outlier_index = outliers->index.data_ptr<int32_t>();
    e.outlier_count = outliers->count.data_ptr<int32_t>();
    e.B = B->data_ptr<int8_t>();
  }
  return e;
}

// ---------------------------------------------------------------------------------------------------
// Argument checks, as torchlowbit/ops/int8_matmul.py raises them.

void check_matmul(const at::Tensor& A, const at::Tensor& B) {
  check_dtype(A, "A", {at::kChar});
  check_dtype(B, "B", {at::kChar});
  TORCH_CHECK_VALUE(B.dim() == 2 && A.dim() > 0 && A.size(-1) == B.size(1), "A must be (..., k) and B (n, k), got A ",
                    shape_str(A.sizes()), " and B ", shape_str(B.sizes()));
  check_same_device(A, "A", B, "B");
}

void check_dequant(at::IntArrayRef out_shape, const at::Tensor& row_stats, const at::Tensor& col_stats,
                   std::optional<at::ScalarType> dtype, const std::optional<at::Tensor>& bias, const at::Tensor& A) {
  check_dtype(row_stats, "row_stats", {at::kFloat});
  check_dtype(col_stats, "col_stats", {at::kFloat});
  TORCH_CHECK_VALUE(!out_shape.empty(), "A must have at least one dimension");
  const int64_t cols = out_shape.back(), rows = c10::multiply_integers(out_shape.slice(0, out_shape.size() - 1));
  TORCH_CHECK_VALUE(row_stats.numel() == rows && col_stats.numel() == cols, "row_stats must have ", num(rows),
                    " and col_stats ", num(cols), " elements for a product of shape ", shape_str(out_shape), ", got ",
                    num(row_stats.numel()), " and ", num(col_stats.numel()));
  if (dtype) check_dtype_arg(*dtype, "dtype");
  if (bias) {
    check_dtype(*bias, "bias");
    TORCH_CHECK_VALUE(bias->numel() == cols, "bias must have ", num(cols), " elements, got ", num(bias->numel()));
    check_same_device(A, "A", *bias, "bias");
  }
  check_same_device(A, "A", row_stats, "row_stats");
  check_same_device(A, "A", col_stats, "col_stats");
}

std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------------------------------------------
// Ops.

at::Tensor int8_linear_matmul_cuda(const at::Tensor& A, const at::Tensor& B) {
  check_matmul(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t rows = leading_rows(A), k = A.size(-1), n = B.size(0);
  at::Tensor out = at::empty(product_shape(A, n), A.options().dtype(at::kInt));
  if (rows == 0 || n == 0) return out;
  const at::Tensor A2 = contiguous_aligned(A.reshape({rows, k}), 16), B2 = contiguous_aligned(B, 16);
  if (use_cublas(rows, k, n)) {
    at::Tensor out2 = out.view({rows, n});
    int_mm(A2, B2, out2);
  } else {
    launch_gemv(A2, B2, out.data_ptr<int32_t>(), epilogue_params(rows, n, k, nullptr, nullptr, {}, nullptr, nullptr));
  }
  return out;
}

at::Tensor int8_mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                                std::optional<at::ScalarType> dtype, const std::optional<at::Tensor>& bias) {
  check_dtype(A, "A", {at::kInt});
  check_dequant(A.sizes(), row_stats, col_stats, dtype, bias, A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = A.size(-1), rows = leading_rows(A);
  if (rows == 0 || n == 0) return out;
  const at::Tensor C = contiguous_aligned(A, 16), rs = row_stats.contiguous(), cs = col_stats.contiguous();
  const std::optional<at::Tensor> b = float_bias(bias);
  const EpilogueParams e = epilogue_params(rows, n, 0, &rs, &cs, b, nullptr, nullptr);
  dispatch_float(out_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_epilogue(C, out.data_ptr<scalar_t>(), e);
  });
  return out;
}

at::Tensor int8_scaled_mm_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                               const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                               std::optional<at::ScalarType> dtype) {
  check_matmul(A, B);
  const std::vector<int64_t> shape = product_shape(A, B.size(0));
  check_dequant(shape, row_stats, col_stats, dtype, bias, A);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t rows = leading_rows(A), k = A.size(-1);
  const at::Tensor A2 = contiguous_aligned(A.reshape({rows, k}), 16), B2 = contiguous_aligned(B, 16);
  return int8_scaled_matmul(A2, B2, &row_stats, col_stats, bias, dtype.value_or(at::kHalf), nullptr).view(shape);
}

}  // namespace

at::Tensor int8_scaled_matmul(const at::Tensor& A, const at::Tensor& B, const at::Tensor* row_stats,
                              const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                              at::ScalarType dtype, const OutlierColumns* outliers) {
  const int64_t rows = A.size(0), k = A.size(1), n = B.size(0);
  at::Tensor out = at::empty({rows, n}, A.options().dtype(dtype));
  if (rows == 0 || n == 0) return out;
  const bool quantize_a = row_stats == nullptr;
  TORCH_INTERNAL_ASSERT(!quantize_a || (gemv_quantizes(rows, k) && A.scalar_type() == dtype && !outliers));
  const at::Tensor rs = quantize_a ? at::Tensor() : row_stats->contiguous(), cs = col_stats.contiguous();
  const std::optional<at::Tensor> b = float_bias(bias);
  const EpilogueParams e = epilogue_params(rows, n, k, quantize_a ? nullptr : &rs, &cs, b, outliers, &B);
  at::Tensor C;
  if (!quantize_a && use_cublas(rows, k, n)) {
    if (int8_matmul_wgmma(A, B, out.data_ptr(), dtype, e)) return out;
    C = at::empty({rows, n}, A.options().dtype(at::kInt));
    int_mm(A, B, C);
  }
  dispatch_float(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (quantize_a) {
      launch_gemv<true>(A, B, out.data_ptr<scalar_t>(), e);
    } else if (C.defined()) {
      launch_epilogue(C, out.data_ptr<scalar_t>(), e);
    } else {
      launch_gemv(A, B, out.data_ptr<scalar_t>(), e);
    }
  });
  return out;
}

bool int8_matmul_quantizes_rows(int64_t rows, int64_t k) { return gemv_quantizes(rows, k); }

}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("int8_linear_matmul", TORCH_FN(lowbit::int8_linear_matmul_cuda));
  m.impl("int8_mm_dequant", TORCH_FN(lowbit::int8_mm_dequant_cuda));
  m.impl("int8_scaled_mm", TORCH_FN(lowbit::int8_scaled_mm_cuda));
}
