// CUDA kernels of lowbit::optimizer_update_32bit and lowbit::optimizer_update_8bit_blockwise and of their
// *_grouped forms (lists of parameters): one fused pass per step (load g, p and the states; update in float32;
// store), the rules of torchlowbit/ops/optimizer_update.py. Every launch takes a table of up to 52 (32-bit) or 44
// (8-bit) tensors in its kernel parameters, each with its own step count; a single-tensor op is a launch of one.
// max_unorm needs a norm pass per tensor, so those launches hold one tensor each.
//
// Rounding: every float32 operation of the reference that reaches a state is one explicitly rounded
// operation here (__fmul_rn, __fadd_rn, __fsqrt_rn, ...: no FMA contraction), in the reference's order, with
// its scalars rounded to float32 as PyTorch's CPU kernels round them, so the states (and the 8-bit codes and
// absmax) equal the CPU reference's bit for bit, except where the reference itself has freedom: the bias
// corrections beta**step (glibc powf there, a float64 pow rounded to float32 here; both almost always the
// correctly rounded value). The update direction u, which only moves p, takes approximate square roots and
// divisions (a few ulps), and the max_unorm norms are summed in another order (in float64): p is within a
// few ulps of lr * u of the reference's (measured: 99.8% of p bit-identical, all codes identical).
//
// 8-bit states: a warp owns whole 256-element blocks (8 elements a lane). It decodes the codes through the
// 256-entry map in shared memory, steps, takes the new absmax with a warp max over the float bits, and
// requantizes to the nearest code as the reference does (nearest_code8.h: one table lookup; the sign fix on
// state1).
//
// max_unorm > 0 (LAMB, LARS): a first pass computes the update exactly as the step does and writes per-CTA
// float64 partial sums of u*u and p*p; every CTA of the step kernel sums them in the same order.
//
// lr and step: a CPU 0-d tensor is read on the host, a device one inside the kernels; nothing synchronizes,
// and the launches are CUDA-graph capturable (with device lr/step, a replay sees their current values).
//
// A knob read at each call, for tests and benchmarks: TORCHLOWBIT_OPTIM_SEARCH=tree forces the fallback
// search.
#include "lowbit_common.h"
#include "nearest_code8.h"

#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

namespace lowbit {
namespace {

// ---------------------------------------------------------------------------------------------------
// Optimizer table (names as torchlowbit/ops/optimizer_update.py OPTIMIZERS).

enum Kind { kAdam = 0, kAdEMAMix = 1, kLion = 2, kMomentum = 3, kRMSprop = 4, kAdagrad = 5 };

struct OptimizerInfo {
  const char* name;
  Kind kind;
  int rows;  // state1 is (rows, *p.shape) when rows > 1
  bool state2;
  bool decoupled;
};

constexpr OptimizerInfo kOptimizers[] = {
    {"adagrad", kAdagrad, 1, false, false}, {"adam", kAdam, 1, true, true},
    {"ademamix", kAdEMAMix, 2, true, true}, {"lamb", kAdam, 1, true, true},
    {"lars", kMomentum, 1, false, false},   {"lion", kLion, 1, false, true},
    {"momentum", kMomentum, 1, false, false}, {"rmsprop", kRMSprop, 1, false, false},
};

const OptimizerInfo& find_optimizer(c10::string_view name) {
  for (const auto& o : kOptimizers)
    if (name == o.name) return o;
  std::string names = "[";
  for (size_t i = 0; i < sizeof(kOptimizers) / sizeof(kOptimizers[0]); ++i)
    names += (i ? ", '" : "'") + std::string(kOptimizers[i].name) + "'";
  TORCH_CHECK_VALUE(false, "optimizer_name must be one of ", names, "], got '", std::string(name), "'");
  return kOptimizers[0];
}

constexpr bool has_state2(int k) { return k == kAdam || k == kAdEMAMix; }
constexpr int state1_rows(int k) { return k == kAdEMAMix ? 2 : 1; }

// ---------------------------------------------------------------------------------------------------
// Scalars. Python floats reach float32 tensor math as float32 (PyTorch casts a scalar operand to the
// op's float32 compute type), so they are rounded on the host; 1 - beta is formed in float64 first, as
// Python does.

enum Flags { kSkipZeros = 1, kL2 = 2, kDecoupled = 4, kClip = 8 };
enum StepType { kStepInt32 = 0, kStepInt64 = 1, kStepFloat32 = 2, kStepFloat64 = 3 };

struct Hyper {
  float beta1, beta2, beta3, alpha, eps, wd, gnorm, max_unorm;
  float omb1, omb2, omb3;  // float32(1 - beta) of the float64 difference
  double wd_d;
  int flags;
  const void* lr_ptr;  // device 0-d lr, or null: lr_value
  int lr_double;       // lr's dtype is float64
  double lr_value;
  const double* partials;  // max_unorm: (sum u^2, sum p^2) per CTA of the norm pass
  int npartials;
};

// A tensor's step count (each tensor of a launch has its own).
struct StepArg {
  const void* ptr;  // device 0-d step, or null: value
  float value;      // step.float()
  int type;
};

__device__ __forceinline__ float load_step(const StepArg& s) {
  if (s.ptr == nullptr) return s.value;
  switch (s.type) {
    case kStepInt32: return static_cast<float>(*static_cast<const int32_t*>(s.ptr));
    case kStepInt64: return static_cast<float>(*static_cast<const int64_t*>(s.ptr));
    case kStepFloat32: return *static_cast<const float*>(s.ptr);
    default: return static_cast<float>(*static_cast<const double*>(s.ptr));
  }
}

// Per-step values derived from lr and a tensor's step. The kernels derive them once per CTA and tensor, ahead of
// their loops (into shared memory: the float64 pow of the bias corrections then adds no register pressure there).
struct Derived {
  float lr, decay, c1, c2, k, ec, mom, rc1, rc2;
};

// The update direction u only moves p (no state depends on it), so its square root and divisions are the
// fast approximate ones (a few ulps): p differs from the reference's by a few ulps of lr * u at most, while
// the states, and so the 8-bit codes, keep the reference's exact float32 operations.
__device__ __forceinline__ float approx_sqrt(float x) {
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float approx_div(float a, float b) { return __fdividef(a, b); }

template <int K>
__device__ __forceinline__ Derived derive(const Hyper& h, float t) {
  Derived d;
  double lr = h.lr_value;
  if (h.lr_ptr != nullptr)
    lr = h.lr_double ? *static_cast<const double*>(h.lr_ptr) : double(*static_cast<const float*>(h.lr_ptr));
  d.lr = static_cast<float>(lr);
  // decay = 1 - lr * weight_decay in lr's dtype, then rounded to float32 when it scales p; 1 (exact) otherwise
  d.decay = 1.0f;
  if (h.flags & kDecoupled)
    d.decay = h.lr_double ? static_cast<float>(1.0 - lr * h.wd_d) : __fsub_rn(1.0f, __fmul_rn(d.lr, h.wd));
  d.c1 = d.c2 = d.k = d.ec = d.mom = d.rc1 = d.rc2 = 0.0f;
  if constexpr (K == kAdam || K == kAdEMAMix) {
    d.c1 = __fsub_rn(1.0f, static_cast<float>(pow(double(h.beta1), double(t))));
    d.c2 = __fsqrt_rn(__fsub_rn(1.0f, static_cast<float>(pow(double(h.beta2), double(t)))));
    d.k = __fdiv_rn(d.c2, d.c1);
    d.ec = __fmul_rn(h.eps, d.c2);
    d.rc1 = __frcp_rn(d.c1);
    d.rc2 = __frcp_rn(d.c2);
  }
  if constexpr (K == kMomentum) d.mom = t != 1.0f ? h.beta1 : 0.0f;  // beta1 * (step != 1)
  return d;
}

// One element of the rule: new states in place, returns the update direction u (before lr).
template <int K>
__device__ __forceinline__ float rule(float g, float& s1a, float& s1b, float& s2, const Hyper& h, const Derived& d) {
  if constexpr (K == kAdam) {
    const float m = __fadd_rn(__fmul_rn(h.beta1, s1a), __fmul_rn(h.omb1, g));
    const float v = __fadd_rn(__fmul_rn(h.beta2, s2), __fmul_rn(__fmul_rn(h.omb2, g), g));
    s1a = m, s2 = v;
    return approx_div(__fmul_rn(d.k, m), __fadd_rn(approx_sqrt(v), d.ec));
  } else if constexpr (K == kAdEMAMix) {
    const float fast = __fadd_rn(__fmul_rn(h.beta1, s1a), __fmul_rn(h.omb1, g));
    const float slow = __fadd_rn(__fmul_rn(h.beta3, s1b), __fmul_rn(h.omb3, g));
    const float nu = __fadd_rn(__fmul_rn(h.beta2, s2), __fmul_rn(__fmul_rn(h.omb2, g), g));
    s1a = fast, s1b = slow, s2 = nu;
    return approx_div(__fadd_rn(__fmul_rn(fast, d.rc1), __fmul_rn(h.alpha, slow)),
                      __fadd_rn(__fmul_rn(approx_sqrt(nu), d.rc2), h.eps));
  } else if constexpr (K == kLion) {
    const float c = __fadd_rn(__fmul_rn(h.beta1, s1a), __fmul_rn(h.omb1, g));
    s1a = __fadd_rn(__fmul_rn(h.beta2, s1a), __fmul_rn(h.omb2, g));
    return (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);  // torch.sign (NaN -> 0)
  } else if constexpr (K == kMomentum) {
    const float m = __fadd_rn(__fmul_rn(d.mom, s1a), g);
    s1a = m;
    return m;
  } else if constexpr (K == kRMSprop) {
    const float s = __fadd_rn(__fmul_rn(h.beta1, s1a), __fmul_rn(__fmul_rn(h.omb1, g), g));
    s1a = s;
    return approx_div(g, __fadd_rn(approx_sqrt(s), h.eps));
  } else {  // Adagrad
    const float s = __fadd_rn(s1a, __fmul_rn(g, g));
    s1a = s;
    return approx_div(g, __fadd_rn(approx_sqrt(s), h.eps));
  }
}

// One element of _step: returns the new p (float32) and updates the states in place. NORM: the norm pass,
// which only adds u^2 (u as the step would scale it) to usq.
template <int K, bool NORM>
__device__ __forceinline__ float step_elem(float p, float g, float& s1a, float& s1b, float& s2, const Hyper& h,
                                           const Derived& d, float uscale, float& usq) {
  g = __fmul_rn(g, h.gnorm);
  const bool keep = !(h.flags & kSkipZeros) || g != 0.0f;
  if (h.flags & kL2) g = __fadd_rn(g, __fmul_rn(h.wd, p));
  float a = s1a, b = s1b, v = s2;
  float u = rule<K>(g, a, b, v, h, d);
  if (!keep) u = 0.0f;
  if constexpr (NORM) {
    usq = __fadd_rn(usq, __fmul_rn(u, u));
    return p;
  }
  if (h.flags & kClip) u = __fmul_rn(u, uscale);
  const float np = __fsub_rn(__fmul_rn(p, d.decay), __fmul_rn(d.lr, u));
  if (!keep) return p;
  s1a = a, s1b = b, s2 = v;
  return np;
}

// The max_unorm scale: every CTA sums the norm pass's partials in one fixed order. All threads call.
__device__ float clip_scale(const Hyper& h, float* slot) {
  if (threadIdx.x < 32) {
    double us = 0.0, ps = 0.0;
    for (int i = threadIdx.x; i < h.npartials; i += 32) us += h.partials[2 * i], ps += h.partials[2 * i + 1];
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
      us += __shfl_xor_sync(0xffffffffu, us, o);
      ps += __shfl_xor_sync(0xffffffffu, ps, o);
    }
    if (threadIdx.x == 0) {
      const float unorm = static_cast<float>(sqrt(us));
      const float limit = __fmul_rn(h.max_unorm, static_cast<float>(sqrt(ps)));
      *slot = unorm > limit ? __fdiv_rn(limit, unorm) : 1.0f;
    }
  }
  __syncthreads();
  return *slot;
}

// Block-wide float64 sums of (a, b) into partials[2 * blockIdx.x + {0, 1}] (norm pass). All threads call.
__device__ void write_partials(double a, double b, double* partials) {
  __shared__ double sa[32], sb[32];
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sa[warp] = a, sb[warp] = b;
  __syncthreads();
  if (threadIdx.x == 0) {
    double ta = 0.0, tb = 0.0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) ta += sa[w], tb += sb[w];
    partials[2 * blockIdx.x] = ta;
    partials[2 * blockIdx.x + 1] = tb;
  }
}

// ---------------------------------------------------------------------------------------------------
// Element access: 8 consecutive elements a thread. `full`: all 8 exist and the pointers allow vectors.

template <typename T>
__device__ __forceinline__ void load8(const T* ptr, int count, bool full, float (&v)[8]) {
  typename Elem<T>::Raw8 r;
  if (full) {
    r = Elem<T>::load8_raw(ptr);
  } else if (count > 0) {
    r = Elem<T>::load8_raw_partial(ptr, count);
  } else {
    r = typename Elem<T>::Raw8{};
  }
  Elem<T>::unpack8(r, v);
}

template <typename T>
__device__ __forceinline__ void store8(T* ptr, int count, bool full, const float (&v)[8]) {
  if (full) {
    Elem<T>::store8(ptr, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < count) Elem<T>::store1(ptr + j, v[j]);
  }
}

__device__ __forceinline__ uint2 load_codes(const uint8_t* ptr, int count, bool full) {
  if (full) return *reinterpret_cast<const uint2*>(ptr);
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < count) w[j >> 2] |= uint32_t(ptr[j]) << (8 * (j & 3));
  return make_uint2(w[0], w[1]);
}

__device__ __forceinline__ void store_codes(uint8_t* ptr, int count, bool full, uint2 c) {
  if (full) {
    *reinterpret_cast<uint2*>(ptr) = c;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < count) ptr[j] = static_cast<uint8_t>(((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xffu);
  }
}

__device__ __forceinline__ uint32_t code_at(uint2 c, int j) { return ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xffu; }

// ---------------------------------------------------------------------------------------------------
// The tensors of one launch. As in PyTorch's multi_tensor_apply, a launch takes a table of up to N tensors by
// value in its kernel parameters (at most 4 KB with the other arguments). The work units of its tensors (8
// elements for 32-bit states, blocks of 256 for 8-bit ones) are numbered one tensor after another in the prefix
// table `first`: a 32-bit CTA finds the tensor of its chunk once (`cta_first`), an 8-bit warp the tensor of each
// of its blocks (`locate`). A single-tensor op is a launch of one tensor, a grouped op as many launches as its
// list needs.

constexpr int kParamBytes = 4000;  // the 4 KB of kernel parameters, less room for alignment

template <int N>
struct TableBase {
  static_assert(N <= 64, "vec holds one bit per tensor");
  static constexpr int kCapacity = N;
  int64_t n[N];          // elements
  StepArg step[N];
  int64_t first[N + 1];  // units before tensor i; first[count] = units
  int64_t units;         // the launch's units (a fixed offset: read in place, no register)
  uint64_t vec;          // bit i: tensor i's pointers allow vector access
  int count;
};

// The tensor of unit u (< units), searching forward from tensor t: a thread's units only increase.
template <typename Table>
__device__ __forceinline__ int locate(const Table& tab, int64_t u, int t) {
  while (u >= tab.first[t + 1]) ++t;
  return t;
}

template <typename Table>
__device__ __forceinline__ bool vec_at(const Table& tab, int t) {
  return (tab.vec >> t) & 1u;
}

// ---------------------------------------------------------------------------------------------------
// 32-bit states: as PyTorch's multi_tensor_apply, every CTA takes a chunk of one tensor's units (a unit is 8
// consecutive elements of one thread). A CTA finds its tensor once, so its loop is the single-tensor loop with
// the tensor's pointers in registers (walking the table per unit made the step 2.6x slower).

constexpr int kThreads32 = 256;
constexpr int kChunk32 = kThreads32 * 8;  // units per CTA of the step: 8 per thread
constexpr int kMaxTensors32 = 52;

template <typename T>
struct Tensors32 : TableBase<kMaxTensors32> {
  using Scalar = T;
  using State = float;
  static constexpr int kStateAlign = 16;      // bytes, for vector access
  static constexpr int64_t kUnitElems = 8;
  T* p[kMaxTensors32];
  const T* g[kMaxTensors32];
  float* s1[kMaxTensors32];
  float* s2[kMaxTensors32];
  int cta_first[kMaxTensors32 + 1];  // CTAs before tensor i
  int64_t chunk;                     // units per CTA
};
static_assert(sizeof(Tensors32<float>) + sizeof(Hyper) + sizeof(double*) <= kParamBytes, "kernel parameters");

// NORM: the max_unorm pass over a launch of one tensor, per-CTA partial sums into `partials`.
template <typename T, int K, bool NORM>
__global__ void __launch_bounds__(kThreads32) update32_kernel(const __grid_constant__ Tensors32<T> tab, const Hyper h,
                                                              double* partials) {
  __shared__ float uscale_slot;
  int t = 0;
  while (int(blockIdx.x) >= tab.cta_first[t + 1]) ++t;
  const Derived d = derive<K>(h, load_step(tab.step[t]));
  float uscale = 1.0f;
  if (!NORM && (h.flags & kClip)) uscale = clip_scale(h, &uscale_slot);
  T* const p = tab.p[t];
  const T* const g = tab.g[t];
  float* const s1 = tab.s1[t];
  float* const s2 = tab.s2[t];
  const int64_t n = tab.n[t];
  const bool vec = vec_at(tab, t);
  const int64_t begin = int64_t(int(blockIdx.x) - tab.cta_first[t]) * tab.chunk;
  const int64_t end = min(begin + tab.chunk, tab.first[t + 1] - tab.first[t]);
  double usum = 0.0, psum = 0.0;
  for (int64_t u = begin + threadIdx.x; u < end; u += kThreads32) {
    const int64_t e0 = u * 8;
    const int64_t rem = n - e0;
    const int count = rem >= 8 ? 8 : int(rem);
    const bool full = vec && count == 8;
    float pv[8], gv[8], s1a[8], s1b[8], s2v[8];
    load8(p + e0, count, full, pv);
    load8(g + e0, count, full, gv);
    load8(s1 + e0, count, full, s1a);
    if constexpr (state1_rows(K) == 2) {
      load8(s1 + n + e0, count, full, s1b);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) s1b[j] = 0.0f;
    }
    if constexpr (has_state2(K)) {
      load8(s2 + e0, count, full, s2v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) s2v[j] = 0.0f;
    }
    float usq = 0.0f, psq = 0.0f;
    float np[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float uj = 0.0f;
      np[j] = step_elem<K, NORM>(pv[j], gv[j], s1a[j], s1b[j], s2v[j], h, d, uscale, uj);
      if constexpr (NORM) {
        if (j < count) usq = __fadd_rn(usq, uj), psq = __fadd_rn(psq, __fmul_rn(pv[j], pv[j]));
      }
    }
    if constexpr (NORM) {
      usum += usq, psum += psq;
    } else {
      store8(p + e0, count, full, np);
      store8(s1 + e0, count, full, s1a);
      if constexpr (state1_rows(K) == 2) store8(s1 + n + e0, count, full, s1b);
      if constexpr (has_state2(K)) store8(s2 + e0, count, full, s2v);
    }
  }
  if constexpr (NORM) write_partials(usum, psum, partials);
}

// ---------------------------------------------------------------------------------------------------
// 8-bit states.

constexpr int kBlock8 = 256;
constexpr int kMaxTensors8 = 44;  // tensors of a launch (see Tensors8)

struct Shared8 {
  float q[2][256];
  float uscale;
  int bad[2];
  int pad;
  Derived derived[kMaxTensors8];  // per tensor of the launch
  CodeTable tab[2];  // one or two are allocated (dynamic shared memory)
};

// Requantizes 8 new state values of this lane's block part (values past the end are 0): the block absmax
// (warp max over |x| bits, NaN-propagating), the nearest codes, and the sign fix (KEEP_SIGN: a state never
// changes sign, as the reference's keep_sign). Returns the packed codes; *absmax_out gets the new absmax.
template <bool KEEP_SIGN>
__device__ __forceinline__ uint2 requantize8(const float (&v)[8], const CodeTable& t, const CodeTableParams& tp,
                                             float* absmax_out) {
  uint32_t key = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) key = max(key, __float_as_uint(v[j]) & 0x7fffffffu);
  key = __reduce_max_sync(0xffffffffu, key);
  const float m = Elem<float>::key_to_float(key);
  *absmax_out = m;
  const float inverse = m > 0.0f ? __frcp_rn(m) : 0.0f;
  uint32_t c[8];
  if (tp.fast) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = nearest_info<true>(__fmul_rn(v[j], inverse), t, tp);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = nearest_info<false>(__fmul_rn(v[j], inverse), t, tp);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t code = c[j] & 0xffu;
    if (KEEP_SIGN) {
      const uint32_t sign = __float_as_uint(v[j]) >> 31;
      if (((c[j] >> 8) & 1u) != sign) code = v[j] > 0.0f ? min(code + 1u, 255u) : (code == 0u ? 0u : code - 1u);
    }
    c[j] = code;
  }
  return make_uint2(c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24), c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24));
}

// vec: p, g 16-byte aligned; codes 8-byte aligned (AdEMAMix: n % 8 == 0)
template <typename T>
struct Tensors8 : TableBase<kMaxTensors8> {
  using Scalar = T;
  using State = uint8_t;
  static constexpr int kStateAlign = 8;
  static constexpr int64_t kUnitElems = kBlock8;
  T* p[kMaxTensors8];
  const T* g[kMaxTensors8];
  uint8_t* s1[kMaxTensors8];
  uint8_t* s2[kMaxTensors8];
  float* am1[kMaxTensors8];
  float* am2[kMaxTensors8];
};

// What the tensors of a launch share.
struct Launch8 {
  const float* q1;
  const float* q2;
  int force_tree;  // TORCHLOWBIT_OPTIM_SEARCH=tree: the fallback search even where a table fits
  double* partials;
};
static_assert(sizeof(Tensors8<float>) + sizeof(Launch8) + sizeof(Hyper) <= kParamBytes, "kernel parameters");

template <typename T>
__device__ __forceinline__ int64_t blocks_of(const Tensors8<T>& tab, int t) {
  return tab.first[t + 1] - tab.first[t];
}

// Decodes one lane's 8 elements of a block, steps them, and zeroes the new states past the end (the
// reference pads the last block with zeros). NORM: adds u^2 and p^2 of the valid elements instead.
template <typename T, int K, bool NORM>
__device__ __forceinline__ void decode_step8(const float* q1, const float* q2, float (&pv)[8], const float (&gv)[8],
                                             uint2 c1a, uint2 c1b, uint2 c2, float am1a, float am1b, float am2,
                                             int count, const Hyper& h, const Derived& d, float uscale, float (&n1a)[8],
                                             float (&n1b)[8], float (&n2)[8], float& usq, float& psq) {
  constexpr bool kTwo = has_state2(K);
  constexpr bool kRows2 = state1_rows(K) == 2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float s1a = __fmul_rn(q1[code_at(c1a, j)], am1a);
    float s1b = kRows2 ? __fmul_rn(q1[code_at(c1b, j)], am1b) : 0.0f;
    float s2 = kTwo ? __fmul_rn(q2[code_at(c2, j)], am2) : 0.0f;
    float uj = 0.0f;
    const float np = step_elem<K, NORM>(pv[j], gv[j], s1a, s1b, s2, h, d, uscale, uj);
    if constexpr (NORM) {
      if (j < count) usq = __fadd_rn(usq, uj), psq = __fadd_rn(psq, __fmul_rn(pv[j], pv[j]));
    } else {
      pv[j] = np;
      n1a[j] = s1a, n1b[j] = s1b, n2[j] = s2;
    }
  }
  if (!NORM && count < 8) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j >= count) n1a[j] = n1b[j] = n2[j] = 0.0f;
  }
}

// The loads of block b of tensor t that go out ahead of its step: its absmax, into registers.
template <typename T, int K>
__device__ __forceinline__ void prefetch8(const Tensors8<T>& tab, int t, int64_t b, float& am1a, float& am1b,
                                          float& am2) {
  am1a = tab.am1[t][b];
  if constexpr (state1_rows(K) == 2) am1b = tab.am1[t][blocks_of(tab, t) + b];
  if constexpr (has_state2(K)) am2 = tab.am2[t][b];
}

constexpr int kThreads8 = 512;
constexpr int kNormThreads8 = 512;

// The step: CTAs of 512 threads, two per SM, loads straight into registers. Each warp walks its blocks (across
// the launch's tensors), the next block's absmax prefetched into registers. Staging the next block's p, g and
// codes through shared memory with cp.async (one CTA of 1024 threads per SM) was slower on an H200: 8-bit Adam
// 2.62 ms against 1.62, Lion 2.31 against 1.17 (benchmarks/NOTES.md).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads8, 2) update8_kernel(const __grid_constant__ Tensors8<T> tab, const Launch8 l,
                                                               const Hyper h) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Shared8& sh = *reinterpret_cast<Shared8*>(smem_raw);
  constexpr bool kTwo = has_state2(K);
  constexpr bool kRows2 = state1_rows(K) == 2;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31;
  const int nwarps = gridDim.x * (nthreads >> 5);

  // the first block's loads go out before the tables are built
  int64_t blk = int64_t(blockIdx.x) * (nthreads >> 5) + (tid >> 5);
  int t = 0;  // the tensor of blk
  float next1a = 0.0f, next1b = 0.0f, next2 = 0.0f;
  if (blk < tab.units) {
    t = locate(tab, blk, t);
    prefetch8<T, K>(tab, t, blk - tab.first[t], next1a, next1b, next2);
  }

  for (int i = tid; i < 256; i += nthreads) {
    sh.q[0][i] = l.q1[i];
    if (kTwo) sh.q[1][i] = l.q2[i];
  }
  for (int i = tid; i < tab.count; i += nthreads) sh.derived[i] = derive<K>(h, load_step(tab.step[i]));
  __syncthreads();
  CodeTableParams tp1{}, tp2{};
  tp1 = build_table(sh.q[0], sh.tab[0], &sh.bad[0], l.force_tree);
  if constexpr (kTwo) tp2 = build_table(sh.q[1], sh.tab[1], &sh.bad[1], l.force_tree);
  float uscale = 1.0f;
  if (h.flags & kClip) uscale = clip_scale(h, &sh.uscale);
  const float* q1 = sh.q[0];
  const float* q2 = sh.q[1];

  for (; blk < tab.units; blk += nwarps) {
    const float am1a = next1a, am1b = next1b, am2 = next2;

    const int64_t b = blk - tab.first[t];  // the block within tensor t
    const Derived& d = sh.derived[t];
    T* const p = tab.p[t];
    uint8_t* const s1 = tab.s1[t];
    uint8_t* const s2 = tab.s2[t];
    float* const am1 = tab.am1[t];
    const int64_t n = tab.n[t], nblocks = blocks_of(tab, t);
    const int64_t e0 = b * kBlock8 + lane * 8;
    const int64_t rem = n - e0;
    const int count = rem >= 8 ? 8 : (rem > 0 ? int(rem) : 0);
    const bool full = vec_at(tab, t) && count == 8;
    float pv[8], gv[8];
    uint2 c1a, c1b = make_uint2(0u, 0u), c2 = make_uint2(0u, 0u);
    load8(p + e0, count, full, pv);
    load8(tab.g[t] + e0, count, full, gv);
    c1a = load_codes(s1 + e0, count, full);
    if (kRows2) c1b = load_codes(s1 + n + e0, count, full);
    if (kTwo) c2 = load_codes(s2 + e0, count, full);
    // the next block's absmax, after this block's loads (before them, Adam's kernel spills)
    const int64_t nxt = blk + nwarps;
    int tn = t;
    if (nxt < tab.units) {
      tn = locate(tab, nxt, t);
      prefetch8<T, K>(tab, tn, nxt - tab.first[tn], next1a, next1b, next2);
    }

    float n1a[8], n1b[8], n2[8], unused_u = 0.0f, unused_p = 0.0f;
    decode_step8<T, K, false>(q1, q2, pv, gv, c1a, c1b, c2, am1a, am1b, am2, count, h, d, uscale, n1a, n1b, n2,
                              unused_u, unused_p);
    float m;
    const uint2 o1a = requantize8<true>(n1a, sh.tab[0], tp1, &m);
    store_codes(s1 + e0, count, full, o1a);
    if (lane == 0) am1[b] = m;
    if constexpr (kRows2) {
      const uint2 o1b = requantize8<true>(n1b, sh.tab[0], tp1, &m);
      store_codes(s1 + n + e0, count, full, o1b);
      if (lane == 0) am1[nblocks + b] = m;
    }
    if constexpr (kTwo) {
      const uint2 o2 = requantize8<false>(n2, sh.tab[1], tp2, &m);
      store_codes(s2 + e0, count, full, o2);
      if (lane == 0) tab.am2[t][b] = m;
    }
    store8(p + e0, count, full, pv);
    t = tn;
  }
}

// The max_unorm pass over a launch of one tensor: u as the step computes it, direct loads, per-CTA float64
// partial sums of u^2 and p^2.
template <typename T, int K>
__global__ void __launch_bounds__(kNormThreads8) norm8_kernel(const __grid_constant__ Tensors8<T> tab, const Launch8 l,
                                                              const Hyper h) {
  __shared__ float q[2][256];
  constexpr bool kTwo = has_state2(K);
  constexpr bool kRows2 = state1_rows(K) == 2;
  for (int i = threadIdx.x; i < 256; i += kNormThreads8) {
    q[0][i] = l.q1[i];
    if (kTwo) q[1][i] = l.q2[i];
  }
  __syncthreads();
  const Derived d = derive<K>(h, load_step(tab.step[0]));
  const int lane = threadIdx.x & 31;
  const T* const p = tab.p[0];
  const T* const g = tab.g[0];
  const uint8_t* const s1 = tab.s1[0];
  const uint8_t* const s2 = tab.s2[0];
  const int64_t n = tab.n[0], nblocks = tab.first[1];
  double usum = 0.0, psum = 0.0;
  const int64_t nwarps = int64_t(gridDim.x) * (kNormThreads8 / 32);
  for (int64_t blk = int64_t(blockIdx.x) * (kNormThreads8 / 32) + (threadIdx.x >> 5); blk < nblocks;
       blk += nwarps) {
    const int64_t e0 = blk * kBlock8 + lane * 8;
    const int64_t rem = n - e0;
    const int count = rem >= 8 ? 8 : (rem > 0 ? int(rem) : 0);
    const bool full = vec_at(tab, 0) && count == 8;
    float pv[8], gv[8];
    load8(p + e0, count, full, pv);
    load8(g + e0, count, full, gv);
    const uint2 c1a = load_codes(s1 + e0, count, full);
    const uint2 c1b = kRows2 ? load_codes(s1 + n + e0, count, full) : make_uint2(0u, 0u);
    const uint2 c2 = kTwo ? load_codes(s2 + e0, count, full) : make_uint2(0u, 0u);
    const float am1a = tab.am1[0][blk];
    const float am1b = kRows2 ? tab.am1[0][nblocks + blk] : 0.0f;
    const float am2 = kTwo ? tab.am2[0][blk] : 0.0f;
    float n1a[8], n1b[8], n2[8], usq = 0.0f, psq = 0.0f;
    decode_step8<T, K, true>(q[0], q[1], pv, gv, c1a, c1b, c2, am1a, am1b, am2, count, h, d, 1.0f, n1a, n1b, n2,
                             usq, psq);
    usum += usq, psum += psq;
  }
  write_partials(usum, psum, l.partials);
}

// ---------------------------------------------------------------------------------------------------
// Host side.

template <typename F>
void dispatch_kind(Kind k, const F& f) {
  switch (k) {
    case kAdam: f(std::integral_constant<int, kAdam>{}); break;
    case kAdEMAMix: f(std::integral_constant<int, kAdEMAMix>{}); break;
    case kLion: f(std::integral_constant<int, kLion>{}); break;
    case kMomentum: f(std::integral_constant<int, kMomentum>{}); break;
    case kRMSprop: f(std::integral_constant<int, kRMSprop>{}); break;
    default: f(std::integral_constant<int, kAdagrad>{}); break;
  }
}

std::string tuple_str(at::IntArrayRef shape) {  // Python's tuple repr: (3,), (2, 3)
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", tuple_str(shape), ", got ", tuple_str(t.sizes()));
}

void check_scalar(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed,
                  const at::Device& device) {
  check_dtype(t, name, allowed);
  TORCH_CHECK_VALUE(t.dim() == 0, name, " must be a 0-d tensor, got shape ", tuple_str(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == device || t.device().is_cpu(), name, " must be on the CPU or on p's device ",
                    device.str(), ", got ", t.device().str());
}

void check_devices(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor* first = nullptr;
  bool same = true;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    if (first == nullptr) first = t;
    same = same && t->device() == first->device();
  }
  if (same) return;
  std::string found;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    found += (found.empty() ? "" : ", ") + std::string(name) + " on " + t->device().str();
  }
  TORCH_CHECK_VALUE(false, "all tensors must be on one device, got ", found);
}

// The checks of _check (both ops) in the reference's order; returns the optimizer.
const OptimizerInfo& check_common(c10::string_view name, const at::Tensor& p, const at::Tensor& g,
                                  const at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                  const at::Tensor& lr, const at::Tensor& step, at::ScalarType state_dtype) {
  const OptimizerInfo& opt = find_optimizer(name);
  check_dtype(p, "p");
  check_dtype(g, "g", {p.scalar_type()});
  check_dtype(state1, "state1", {state_dtype});
  check_shape(g, "g", p.sizes());
  std::vector<int64_t> s1_shape;
  if (opt.rows > 1) s1_shape.push_back(opt.rows);
  for (auto s : p.sizes()) s1_shape.push_back(s);
  check_shape(state1, "state1", s1_shape);
  TORCH_CHECK_VALUE(opt.state2 == state2.has_value(), "optimizer '", std::string(name), "' ",
                    opt.state2 ? "needs a state2 tensor" : "has one state: state2 must be None");
  if (state2.has_value()) {
    check_dtype(*state2, "state2", {state_dtype});
    check_shape(*state2, "state2", p.sizes());
  }
  check_devices({{"p", &p}, {"g", &g}, {"state1", &state1}, {"state2", state2.has_value() ? &*state2 : nullptr}});
  check_scalar(lr, "lr", {at::kFloat, at::kDouble}, p.device());
  check_scalar(step, "step", {at::kInt, at::kLong, at::kFloat, at::kDouble}, p.device());
  return opt;
}

Hyper make_hyper(const OptimizerInfo& opt, const at::Tensor& lr, double beta1, double beta2, double beta3,
                 double alpha, double eps, double weight_decay, double gnorm_scale, double max_unorm,
                 bool skip_zeros) {
  Hyper h{};
  h.beta1 = static_cast<float>(beta1), h.beta2 = static_cast<float>(beta2), h.beta3 = static_cast<float>(beta3);
  h.alpha = static_cast<float>(alpha), h.eps = static_cast<float>(eps), h.wd = static_cast<float>(weight_decay);
  h.gnorm = static_cast<float>(gnorm_scale), h.max_unorm = static_cast<float>(max_unorm);
  h.omb1 = static_cast<float>(1.0 - beta1), h.omb2 = static_cast<float>(1.0 - beta2);
  h.omb3 = static_cast<float>(1.0 - beta3);
  h.wd_d = weight_decay;
  const bool decay = weight_decay != 0.0;  // Python truthiness (NaN decays)
  h.flags = (skip_zeros ? kSkipZeros : 0) | (decay && !opt.decoupled ? kL2 : 0) |
            (decay && opt.decoupled ? kDecoupled : 0) | (max_unorm > 0.0 ? kClip : 0);
  h.lr_double = lr.scalar_type() == at::kDouble;
  if (lr.is_cpu()) {
    h.lr_value = h.lr_double ? lr.item<double>() : double(lr.item<float>());
  } else {
    h.lr_ptr = lr.data_ptr();
  }
  return h;
}

// A CPU step is read here (through its pointer: no dispatch per tensor), a device one in the kernels.
StepArg step_arg(const at::Tensor& step) {
  StepArg s{};
  switch (step.scalar_type()) {
    case at::kInt: s.type = kStepInt32; break;
    case at::kLong: s.type = kStepInt64; break;
    case at::kFloat: s.type = kStepFloat32; break;
    default: s.type = kStepFloat64; break;
  }
  if (!step.is_cpu()) {
    s.ptr = step.data_ptr();
    return s;
  }
  const void* v = step.data_ptr();
  switch (s.type) {
    case kStepInt32: s.value = static_cast<float>(*static_cast<const int32_t*>(v)); break;
    case kStepInt64: s.value = static_cast<float>(*static_cast<const int64_t*>(v)); break;
    case kStepFloat32: s.value = *static_cast<const float*>(v); break;
    default: s.value = static_cast<float>(*static_cast<const double*>(v)); break;
  }
  return s;
}

// Contiguous stand-ins of the non-contiguous tensors an update writes, copied back into them at the end.
class WriteBack {
 public:
  at::Tensor work(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    at::Tensor w = t.contiguous();
    pending_.emplace_back(t, w);
    return w;
  }
  void finish() {
    for (auto& [t, w] : pending_) t.copy_(w);
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
};

// One tensor's update as the kernels take it: contiguous tensors. s2 and am2 are undefined for optimizers with
// one state, am1 and am2 for 32-bit states.
struct Item {
  at::Tensor p, g, s1, s2, am1, am2;
  StepArg step;
};

Item make_item(WriteBack& out, const at::Tensor& p, const at::Tensor& g, const at::Tensor& state1,
               const std::optional<at::Tensor>& state2, const at::Tensor& step,
               const std::optional<at::Tensor>& absmax1 = std::nullopt,
               const std::optional<at::Tensor>& absmax2 = std::nullopt) {
  Item it;
  it.p = out.work(p);
  it.g = g.contiguous();
  it.s1 = out.work(state1);
  if (state2.has_value()) it.s2 = out.work(*state2);
  if (absmax1.has_value()) it.am1 = out.work(*absmax1);
  if (absmax2.has_value()) it.am2 = out.work(*absmax2);
  it.step = step_arg(step);
  return it;
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Adds the common fields of the tensor whose pointers were just written at index tab.count.
template <typename Table>
void append(Table& tab, int64_t n, int64_t units, const StepArg& step, bool vec) {
  const int i = tab.count++;
  tab.n[i] = n;
  tab.step[i] = step;
  tab.first[i + 1] = tab.first[i] + units;
  tab.units = tab.first[i + 1];
  if (vec) tab.vec |= uint64_t{1} << i;
}

// Calls f(begin, end) for consecutive ranges of at most `per_launch` of `count` items.
template <typename F>
void in_launches(size_t count, size_t per_launch, const F& f) {
  for (size_t begin = 0; begin < count; begin += per_launch) f(begin, std::min(count, begin + per_launch));
}

// Writes `it` into the table (its states' type, alignment and unit from the table; blockwise states also their
// absmax) for the optimizer kind K.
template <int K, typename Table>
void add_item(Table& tab, const Item& it) {
  using T = typename Table::Scalar;
  using State = typename Table::State;
  const int i = tab.count;
  tab.p[i] = it.p.data_ptr<T>();
  tab.g[i] = it.g.data_ptr<T>();
  tab.s1[i] = it.s1.data_ptr<State>();
  tab.s2[i] = has_state2(K) ? it.s2.data_ptr<State>() : nullptr;
  if constexpr (std::is_same_v<State, uint8_t>) {
    tab.am1[i] = it.am1.data_ptr<float>();
    tab.am2[i] = has_state2(K) ? it.am2.data_ptr<float>() : nullptr;
  }
  const int64_t n = it.p.numel();
  constexpr int a = Table::kStateAlign;
  const bool vec = aligned(tab.p[i], 16) && aligned(tab.g[i], 16) && aligned(tab.s1[i], a) &&
                   (tab.s2[i] == nullptr || aligned(tab.s2[i], a)) &&
                   (state1_rows(K) == 1 || n % (a / int(sizeof(State))) == 0);  // the second row aligned too
  append(tab, n, ceil_div(n, Table::kUnitElems), it.step, vec);
}

// Runs the updates of `items` (one dtype and device) in launches of as many tensors as a Table holds (one with
// max_unorm, whose norm pass is per tensor); launch(tab, kc) launches a table, T (the table's Scalar) and K
// (kc's value) dispatched from the dtype and the optimizer.
template <template <typename> class Table, typename Launch>
void run_in_tables(const OptimizerInfo& opt, const std::vector<Item>& items, const Hyper& h, const Launch& launch) {
  if (items.empty()) return;
  dispatch_float(items[0].p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_kind(opt.kind, [&](auto kc) {
      in_launches(items.size(), (h.flags & kClip) ? 1 : Table<T>::kCapacity, [&](size_t begin, size_t end) {
        Table<T> tab{};
        for (size_t k = begin; k < end; ++k) add_item<decltype(kc)::value>(tab, items[k]);
        launch(tab, kc);
      });
    });
  });
}

constexpr int kMaxNormPartials = 1024;

// Splits the launch's tensors into chunks of `chunk` units, one CTA each; returns the CTAs.
template <typename T>
int split(Tensors32<T>& tab, int64_t chunk) {
  tab.chunk = chunk;
  for (int i = 0; i < tab.count; ++i)
    tab.cta_first[i + 1] = tab.cta_first[i] + static_cast<int>(ceil_div(tab.first[i + 1] - tab.first[i], chunk));
  return tab.cta_first[tab.count];
}

template <typename T, int K>
void launch32(Tensors32<T> tab, Hyper h, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor partials;
  if (h.flags & kClip) {  // a launch of one tensor; at most kMaxNormPartials CTAs
    const int64_t ctas = persistent_grid<update32_kernel<T, K, true>>(
        kThreads32, std::min<int64_t>(ceil_div(tab.units, kThreads32), kMaxNormPartials));
    const int grid = split(tab, ceil_div(tab.units, ctas));
    partials = at::empty({2 * grid}, options.dtype(at::kDouble));
    update32_kernel<T, K, true><<<grid, kThreads32, 0, stream>>>(tab, h, partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    h.partials = partials.data_ptr<double>();
    h.npartials = grid;
  }
  const int grid = split(tab, kChunk32);
  update32_kernel<T, K, false><<<grid, kThreads32, 0, stream>>>(tab, h, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The 32-bit updates of `items` (one dtype and device), as many tensors a launch as fit; max_unorm needs each
// tensor's own norm pass, so one a launch then.
void run32(const OptimizerInfo& opt, const std::vector<Item>& items, const Hyper& h) {
  if (items.empty()) return;
  const at::TensorOptions options = items[0].p.options();
  const cudaStream_t stream = current_stream();
  run_in_tables<Tensors32>(opt, items, h, [&](auto& tab, auto kc) {
    using T = typename std::decay_t<decltype(tab)>::Scalar;
    launch32<T, decltype(kc)::value>(tab, h, options, stream);
  });
}

template <typename T, int K>
void launch8(const Tensors8<T>& tab, Launch8 l, Hyper h, const at::TensorOptions& options, cudaStream_t stream) {
  const int64_t nblocks = tab.units;
  at::Tensor partials;
  if (h.flags & kClip) {  // a launch of one tensor
    const int grid = persistent_grid<norm8_kernel<T, K>>(
        kNormThreads8, std::min<int64_t>(ceil_div(nblocks, kNormThreads8 / 32), kMaxNormPartials));
    partials = at::empty({2 * grid}, options.dtype(at::kDouble));
    l.partials = partials.data_ptr<double>();
    norm8_kernel<T, K><<<grid, kNormThreads8, 0, stream>>>(tab, l, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    h.partials = l.partials;
    h.npartials = grid;
  }
  const size_t smem = offsetof(Shared8, tab) + (has_state2(K) ? 2 : 1) * sizeof(CodeTable);
  raise_smem_limit<update8_kernel<T, K>>(smem);
  const int grid = persistent_grid<update8_kernel<T, K>>(kThreads8, ceil_div(nblocks, kThreads8 / 32), smem);
  update8_kernel<T, K><<<grid, kThreads8, smem, stream>>>(tab, l, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The 8-bit updates of `items` (one dtype and device, one pair of maps), as run32.
void run8(const OptimizerInfo& opt, const std::vector<Item>& items, const at::Tensor& qmap1,
          const std::optional<at::Tensor>& qmap2, const Hyper& h) {
  if (items.empty()) return;
  const at::Tensor q1 = qmap1.contiguous();
  const at::Tensor q2 = opt.state2 ? qmap2->contiguous() : at::Tensor();
  Launch8 l{};
  l.q1 = q1.data_ptr<float>();
  l.q2 = opt.state2 ? q2.data_ptr<float>() : nullptr;
  const char* search = std::getenv("TORCHLOWBIT_OPTIM_SEARCH");  // debugging and benchmarks: "tree"
  l.force_tree = search != nullptr && std::string(search) == "tree";
  const at::TensorOptions options = items[0].p.options();
  const cudaStream_t stream = current_stream();
  run_in_tables<Tensors8>(opt, items, h, [&](auto& tab, auto kc) {
    using T = typename std::decay_t<decltype(tab)>::Scalar;
    launch8<T, decltype(kc)::value>(tab, l, h, options, stream);
  });
}

// The checks of _check_8bit (the 8-bit ops) in the reference's order; returns the optimizer.
const OptimizerInfo& check_8bit(c10::string_view name, const at::Tensor& p, const at::Tensor& g,
                                const at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                const at::Tensor& absmax1, const std::optional<at::Tensor>& absmax2,
                                const at::Tensor& qmap1, const std::optional<at::Tensor>& qmap2, const at::Tensor& lr,
                                const at::Tensor& step) {
  const OptimizerInfo& opt = check_common(name, p, g, state1, state2, lr, step, at::kByte);
  const int64_t nblocks = ceil_div(p.numel(), kBlock8);
  check_dtype(absmax1, "absmax1", {at::kFloat});
  const std::string what1 = std::to_string(opt.rows) + " x " + std::to_string(nblocks) + " blocks of 256";
  check_numel(absmax1, "absmax1", opt.rows * nblocks, what1.c_str());
  check_code(qmap1, "qmap1");
  TORCH_CHECK_VALUE(absmax2.has_value() == state2.has_value(),
                    "absmax2 must be given exactly when state2 is (optimizer with two states)");
  TORCH_CHECK_VALUE(qmap2.has_value() == state2.has_value(),
                    "qmap2 must be given exactly when state2 is (optimizer with two states)");
  if (absmax2.has_value()) {
    check_dtype(*absmax2, "absmax2", {at::kFloat});
    check_numel(*absmax2, "absmax2", nblocks, "one per block of 256");
    check_code(*qmap2, "qmap2");
  }
  check_devices({{"p", &p},
                 {"absmax1", &absmax1},
                 {"absmax2", absmax2.has_value() ? &*absmax2 : nullptr},
                 {"qmap1", &qmap1},
                 {"qmap2", qmap2.has_value() ? &*qmap2 : nullptr}});
  return opt;
}

// The grouped ops' list checks (the reference's _check_lists): one entry per parameter (none of an absent second
// state), p of one dtype and one device.
void check_lists(const OptimizerInfo& opt, at::TensorList p,
                 std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  for (const auto& [arg, tensors] : lists) {
    const std::string name = arg;
    const auto size = static_cast<int64_t>(tensors.size());
    if ((name == "state2" || name == "absmax2") && !opt.state2) {
      TORCH_CHECK_VALUE(size == 0, "optimizer '", opt.name, "' has one state: ", name, " must be empty, got ",
                        num(size), " tensors");
    } else {
      TORCH_CHECK_VALUE(tensors.size() == p.size(), name, " must hold one tensor per parameter (", num(p.size()),
                        "), got ", num(size));
    }
  }
  for (size_t i = 1; i < p.size(); ++i) {
    TORCH_CHECK_TYPE(p[i].scalar_type() == p[0].scalar_type(), "p[", num(i), "] must have the dtype of p[0] (torch.",
                     dtype_name(p[0].scalar_type()), "), got torch.", dtype_name(p[i].scalar_type()));
    TORCH_CHECK_VALUE(p[i].device() == p[0].device(), "all tensors must be on one device, got p[0] on ",
                      p[0].device().str(), ", p[", num(i), "] on ", p[i].device().str());
  }
}

// Entry i of a list that is empty where the optimizer has no such state.
std::optional<at::Tensor> entry(at::TensorList list, size_t i) {
  return list.empty() ? std::nullopt : std::optional<at::Tensor>(list[i]);
}

// One entry's checks; an error names the entry, as the reference's _entries.
template <typename F>
void check_entry(size_t i, const F& check) {
  try {
    check();
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "entry ", num(i), " of the lists: ", e.msg());
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, "entry ", num(i), " of the lists: ", e.msg());
  }
}

void optimizer_update_32bit_cuda(c10::string_view optimizer_name, at::Tensor& p, const at::Tensor& g,
                                 at::Tensor& state1, const std::optional<at::Tensor>& state2, const at::Tensor& lr,
                                 const at::Tensor& step, double beta1, double beta2, double beta3, double alpha,
                                 double eps, double weight_decay, double gnorm_scale, double max_unorm,
                                 bool skip_zeros) {
  const OptimizerInfo& opt = check_common(optimizer_name, p, g, state1, state2, lr, step, at::kFloat);
  const c10::cuda::CUDAGuard guard(p.device());
  if (p.numel() == 0) return;
  WriteBack out;
  run32(opt, {make_item(out, p, g, state1, state2, step)},
        make_hyper(opt, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, max_unorm, skip_zeros));
  out.finish();
}

void optimizer_update_8bit_blockwise_cuda(c10::string_view optimizer_name, at::Tensor& p, const at::Tensor& g,
                                          at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                          at::Tensor& absmax1, const std::optional<at::Tensor>& absmax2,
                                          const at::Tensor& qmap1, const std::optional<at::Tensor>& qmap2,
                                          const at::Tensor& lr, const at::Tensor& step, double beta1, double beta2,
                                          double beta3, double alpha, double eps, double weight_decay,
                                          double gnorm_scale, double max_unorm, bool skip_zeros) {
  const OptimizerInfo& opt =
      check_8bit(optimizer_name, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, step);
  const c10::cuda::CUDAGuard guard(p.device());
  if (p.numel() == 0) return;
  WriteBack out;
  run8(opt, {make_item(out, p, g, state1, state2, step, absmax1, absmax2)}, qmap1, qmap2,
       make_hyper(opt, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, max_unorm, skip_zeros));
  out.finish();
}

void optimizer_update_32bit_grouped_cuda(c10::string_view optimizer_name, at::TensorList p, at::TensorList g,
                                         at::TensorList state1, at::TensorList state2, const at::Tensor& lr,
                                         at::TensorList step, double beta1, double beta2, double beta3, double alpha,
                                         double eps, double weight_decay, double gnorm_scale, double max_unorm,
                                         bool skip_zeros) {
  const OptimizerInfo& opt = find_optimizer(optimizer_name);
  check_lists(opt, p, {{"g", g}, {"state1", state1}, {"state2", state2}, {"step", step}});
  for (size_t i = 0; i < p.size(); ++i) {
    check_entry(i, [&] {
      check_common(optimizer_name, p[i], g[i], state1[i], entry(state2, i), lr, step[i], at::kFloat);
    });
  }
  if (p.empty()) return;
  const c10::cuda::CUDAGuard guard(p[0].device());
  WriteBack out;
  std::vector<Item> items;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i].numel() > 0) items.push_back(make_item(out, p[i], g[i], state1[i], entry(state2, i), step[i]));
  }
  run32(opt, items,
        make_hyper(opt, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, max_unorm, skip_zeros));
  out.finish();
}

void optimizer_update_8bit_blockwise_grouped_cuda(
    c10::string_view optimizer_name, at::TensorList p, at::TensorList g, at::TensorList state1,
    at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, const at::Tensor& lr, at::TensorList step, double beta1, double beta2,
    double beta3, double alpha, double eps, double weight_decay, double gnorm_scale, double max_unorm,
    bool skip_zeros) {
  const OptimizerInfo& opt = find_optimizer(optimizer_name);
  check_lists(opt, p,
              {{"g", g}, {"state1", state1}, {"state2", state2}, {"absmax1", absmax1}, {"absmax2", absmax2},
               {"step", step}});
  for (size_t i = 0; i < p.size(); ++i) {
    check_entry(i, [&] {
      check_8bit(optimizer_name, p[i], g[i], state1[i], entry(state2, i), absmax1[i], entry(absmax2, i), qmap1,
                 qmap2, lr, step[i]);
    });
  }
  if (p.empty()) return;
  const c10::cuda::CUDAGuard guard(p[0].device());
  WriteBack out;
  std::vector<Item> items;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i].numel() > 0) {
      items.push_back(
          make_item(out, p[i], g[i], state1[i], entry(state2, i), step[i], absmax1[i], entry(absmax2, i)));
    }
  }
  run8(opt, items, qmap1, qmap2,
       make_hyper(opt, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, max_unorm, skip_zeros));
  out.finish();
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("optimizer_update_32bit", TORCH_FN(lowbit::optimizer_update_32bit_cuda));
  m.impl("optimizer_update_8bit_blockwise", TORCH_FN(lowbit::optimizer_update_8bit_blockwise_cuda));
  m.impl("optimizer_update_32bit_grouped", TORCH_FN(lowbit::optimizer_update_32bit_grouped_cuda));
  m.impl("optimizer_update_8bit_blockwise_grouped", TORCH_FN(lowbit::optimizer_update_8bit_blockwise_grouped_cuda));
}
