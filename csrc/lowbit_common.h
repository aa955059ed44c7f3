// Shared helpers of the lowbit CUDA kernels: argument checks that mirror torchlowbit/ops/checks.py,
// element loads/stores, the NaN-propagating max of the reference's amax, and launch sizing.
//
// Named .h (not .cuh) on purpose: setup.py and the JIT build compile every csrc/*.c[up]* as a source.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

namespace lowbit {

// ---------------------------------------------------------------------------------------------------
// Argument checks (ValueError / TypeError naming the argument, as the Python reference raises them).

// Numbers go into messages as std::string (std::to_string): formatting them through an ostream
// instantiated in this library crashed (a libstdc++ mismatch between the JIT-built extension and torch
// on the device machine), while strings insert fine.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: return c10::toString(t);
  }
}

inline std::string dtype_names(std::initializer_list<at::ScalarType> allowed) {
  std::string s = "(";
  bool first = true;
  for (auto t : allowed) {
    if (!first) s += ", ";
    s += dtype_name(t);
    first = false;
  }
  return s + ")";
}

inline bool dtype_in(at::ScalarType t, std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed)
    if (a == t) return true;
  return false;
}

constexpr std::initializer_list<at::ScalarType> kFloatDtypes = {at::kHalf, at::kBFloat16, at::kFloat};
constexpr std::initializer_list<at::ScalarType> kStorageDtypes = {at::kByte, at::kHalf, at::kBFloat16, at::kFloat};

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed = kFloatDtypes) {
  TORCH_CHECK_TYPE(dtype_in(t.scalar_type(), allowed), name, " must have dtype in ", dtype_names(allowed),
                   ", got ", dtype_name(t.scalar_type()));
}

inline void check_dtype_arg(at::ScalarType t, const char* name,
                            std::initializer_list<at::ScalarType> allowed = kFloatDtypes) {
  TORCH_CHECK_TYPE(dtype_in(t, allowed), name, " must be one of ", dtype_names(allowed), ", got ", dtype_name(t));
}

inline int log2_blocksize(int64_t blocksize, const char* name = "blocksize") {
  for (int k = 5; k <= 12; ++k)
    if (blocksize == (int64_t{1} << k)) return k;
  TORCH_CHECK_VALUE(false, name, " must be a power of two in [32, 4096], got ", num(blocksize));
  return 0;
}

inline void check_numel(const at::Tensor& t, const char* name, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == expected, name, " must have ", num(expected), " elements (", what, "), got ",
                    num(t.numel()));
}

inline void check_code(const at::Tensor& code, const char* name = "code", int64_t entries = 256) {
  check_dtype(code, name, {at::kFloat});
  TORCH_CHECK_VALUE(code.numel() == entries, name, " must have ", num(entries), " elements (a ", num(entries),
                    "-entry float32 code), got ", num(code.numel()));
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "all tensors must be on one device, got ", ref_name, " on ",
                    ref.device().str(), ", ", name, " on ", t.device().str());
}

// 0 = nf4, 1 = fp4
inline int parse_quant_type(c10::string_view quant_type) {
  if (quant_type == "nf4") return 0;
  if (quant_type == "fp4") return 1;
  TORCH_CHECK_VALUE(false, "quant_type must be one of ('nf4', 'fp4'), got '", std::string(quant_type), "'");
  return 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A contiguous tensor with A's values whose data pointer is aligned to `alignment` bytes (a fresh copy
// only for a misaligned view such as x[1:]).
inline at::Tensor contiguous_aligned(const at::Tensor& A, int64_t alignment) {
  at::Tensor x = A.contiguous();
  if (x.numel() > 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % alignment != 0) {
    at::Tensor copy = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    copy.copy_(x);
    return copy;
  }
  return x;
}

// The current CUDA stream (c10::cuda's, the same one at::cuda::getCurrentCUDAStream returns).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// compute(device) for the current device, computed once per device (devices past 64 on every call). Each lambda
// type, so each call site of each template instantiation, has its own cache.
template <typename F>
inline auto per_device(F compute) {
  using Value = decltype(compute(0));
  static Value values[64] = {};
  static std::once_flag once[64];
  const int device = c10::cuda::current_device();
  if (device >= 64) return compute(device);
  std::call_once(once[device], [&] { values[device] = compute(device); });
  return values[device];
}

// Attribute `Attr` of the current device.
template <cudaDeviceAttr Attr>
inline int device_attribute() {
  return per_device([](int device) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, Attr, device));
    return v;
  });
}

// CTAs of Kernel with `threads` threads and `smem` bytes of dynamic shared memory that fit on an SM (at least 1).
template <auto Kernel>
inline int ctas_per_sm(int threads, size_t smem) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, threads, smem));
  return n > 0 ? n : 1;
}

inline int multiprocessor_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// The configuration of a launch on the current stream, without attributes.
inline cudaLaunchConfig_t launch_config(unsigned grid, unsigned block, size_t smem) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = smem;
  config.stream = current_stream();
  return config;
}

// Launches `kernel` on the current stream; with `overlap_previous`, by programmatic dependent launch where the device
// has it (sm_90+): its CTAs may then start while the previous kernel of the stream finishes, so the kernel must call
// wait_for_previous_grid() (gemm_4bit_device.h) before it touches memory that kernel may write or read.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem, bool overlap_previous,
                   Args&&... args) {
  cudaLaunchConfig_t config = launch_config(grid, block, smem);
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap_previous && device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// A tuning override: the integer in environment variable `name` (`fallback` when it is unset or empty). Any other
// value outside [lo, hi], or not an integer, is an error rather than silently ignored. Callers read it once per
// process.
inline int env_override(const char* name, int lo, int hi, int fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && errno == 0 && (v == fallback || (v >= lo && v <= hi)), "environment variable ",
                    name, " must be an integer in [", num(lo), ", ", num(hi), "] (or ", num(fallback),
                    ": the default), got '", env, "'");
  return static_cast<int>(v);
}

// Raises Kernel's dynamic shared-memory limit on the current device to `smem` bytes (more than 48 KB needs the
// opt-in), once per device and size.
template <auto Kernel>
inline void raise_smem_limit(size_t smem) {
  static size_t set[64] = {};  // per device: the limit last set
  const int device = c10::cuda::current_device();
  if (device < 64 && set[device] >= smem) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (device < 64) set[device] = smem;
}

// Persistent grid: as many CTAs as fit on the device at once, but no more than there is work for.
// `smem`: the kernel's dynamic shared memory, the same at every launch of this Kernel.
template <auto Kernel>
inline int persistent_grid(int threads, int64_t work_ctas, int64_t smem = 0) {
  const int per_sm = per_device([=](int) { return ctas_per_sm<Kernel>(threads, static_cast<size_t>(smem)); });
  const int64_t sms = multiprocessor_count();
  int64_t grid = per_sm * sms;
  if (work_ctas < grid) grid = work_ctas;
  return static_cast<int>(grid > 0 ? grid : 1);
}

// ---------------------------------------------------------------------------------------------------
// Device helpers.

// Elements as float32 (exact for fp16/bf16). Quantization reads 8 consecutive elements as raw bits
// (Raw8), takes the block absmax on the bits (|x| bits are ordered like |x| as unsigned integers, NaN
// above inf, so an integer max propagates NaN) and unpacks to float. A NaN absmax is written as the
// default NaN 0x7fc00000, the bits the CPU reference's amax gives for any NaN input.
constexpr uint32_t kDefaultNaN = 0x7fc00000u;

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  struct Raw8 {
    uint4 a, b;
  };
  __device__ __forceinline__ static Raw8 load8_raw(const float* p) {  // 16-byte aligned
    return {__ldg(reinterpret_cast<const uint4*>(p)), __ldg(reinterpret_cast<const uint4*>(p) + 1)};
  }
  // Elements [0, count) of p (count < 8), zero bits beyond.
  __device__ __forceinline__ static Raw8 load8_raw_partial(const float* p, int64_t count) {
    uint32_t w[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = j < count ? __float_as_uint(p[j]) : 0u;
    return {make_uint4(w[0], w[1], w[2], w[3]), make_uint4(w[4], w[5], w[6], w[7])};
  }
  __device__ __forceinline__ static void unpack8(const Raw8& r, float (&v)[8]) {
    v[0] = __uint_as_float(r.a.x), v[1] = __uint_as_float(r.a.y), v[2] = __uint_as_float(r.a.z);
    v[3] = __uint_as_float(r.a.w), v[4] = __uint_as_float(r.b.x), v[5] = __uint_as_float(r.b.y);
    v[6] = __uint_as_float(r.b.z), v[7] = __uint_as_float(r.b.w);
  }
  __device__ __forceinline__ static uint32_t abs_key8(const Raw8& r) {
    const uint32_t m = 0x7fffffffu;
    const uint32_t a = max(max(r.a.x & m, r.a.y & m), max(r.a.z & m, r.a.w & m));
    const uint32_t b = max(max(r.b.x & m, r.b.y & m), max(r.b.z & m, r.b.w & m));
    return max(a, b);
  }
  __device__ __forceinline__ static float key_to_float(uint32_t k) {
    return __uint_as_float(k > 0x7f800000u ? kDefaultNaN : k);
  }
  // Store 8 values (32 bytes, 16-byte aligned).
  __device__ __forceinline__ static void store8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  __device__ __forceinline__ static void store1(float* p, float v) { *p = v; }
};

// Shared by the two 16-bit types: 8 elements in one 16-byte vector.
struct Elem16 {
  using Raw8 = uint4;
  __device__ __forceinline__ static Raw8 load8_raw(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ static Raw8 load8_raw_partial(const void* p, int64_t count) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
    uint32_t h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) h[j] = j < count ? uint32_t(q[j]) : 0u;
    return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
  }
  __device__ __forceinline__ static uint32_t abs_key8(const Raw8& r) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    uint32_t k = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) k = max(k, max(w[i] & 0x7fffu, (w[i] >> 16) & 0x7fffu));
    return k;
  }
};

template <>
struct Elem<at::BFloat16> : Elem16 {
  __device__ __forceinline__ static void unpack8(const Raw8& r, float (&v)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static float key_to_float(uint32_t k) {
    return __uint_as_float(k > 0x7f80u ? kDefaultNaN : k << 16);
  }
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // round to nearest even; .x (a) in the low half
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void store8(at::BFloat16* p, const float (&v)[8]) {
    uint4 r;
    r.x = pack2(v[0], v[1]), r.y = pack2(v[2], v[3]), r.z = pack2(v[4], v[5]), r.w = pack2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = r;
  }
  __device__ __forceinline__ static void store1(at::BFloat16* p, float v) {
    __nv_bfloat16 h = __float2bfloat16_rn(v);
    *reinterpret_cast<__nv_bfloat16*>(p) = h;
  }
};

template <>
struct Elem<at::Half> : Elem16 {
  __device__ __forceinline__ static void unpack8(const Raw8& r, float (&v)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
  __device__ __forceinline__ static float key_to_float(uint32_t k) {
    if (k > 0x7c00u) return __uint_as_float(kDefaultNaN);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(k)));
  }
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void store8(at::Half* p, const float (&v)[8]) {
    uint4 r;
    r.x = pack2(v[0], v[1]), r.y = pack2(v[2], v[3]), r.z = pack2(v[4], v[5]), r.w = pack2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = r;
  }
  __device__ __forceinline__ static void store1(at::Half* p, float v) {
    __half h = __float2half_rn(v);
    *reinterpret_cast<__half*>(p) = h;
  }
};

// Calls f(T{}) with T the C++ type of a float dtype (float, at::Half, at::BFloat16).
template <typename F>
inline void dispatch_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype_name(t));
  }
}

}  // namespace lowbit
