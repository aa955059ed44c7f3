// Hopper (sm_90a) building blocks shared by the wgmma kernels (gemm_4bit_wgmma.cu, int8_matmul_wgmma.cu): shared-memory
// operand descriptors, the wgmma fences, mbarriers, bulk tensor copies (multicast among a cluster's CTAs), cluster
// launches and barriers, and register reallocation. The device helpers exist only in sm_90a passes (setup.py and the
// JIT build turn 9.0 into 9.0a and define LOWBIT_SM90A); the host checks the device with sm90a_device() before it
// launches such a kernel.
#pragma once

#include "lowbit_common.h"

#include <cudaTypedefs.h>

#include <algorithm>

namespace lowbit {

// Whether this build has sm_90a kernels and the current device runs them.
inline bool sm90a_device() {
#if defined(LOWBIT_SM90A)
  return device_attribute<cudaDevAttrComputeCapabilityMajor>() == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>() == 0;
#else
  return false;
#endif
}

// cuTensorMapEncodeTiled from the driver, through the runtime (the extension does not link libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The tensor map of a row-major matrix (rows, cols) of `type` at `data` (16-byte aligned, row_bytes apart, a multiple
// of 16), copied in boxes of box_rows x box_cols with `swizzle` (the box's row at most the swizzle's width); elements
// outside the matrix arrive as zeros.
inline CUtensorMap tile_map_2d(const void* data, CUtensorMapDataType type, int64_t rows, int64_t cols,
                               int64_t row_bytes, int box_rows, int box_cols, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = tensor_map_encoder()(&map, type, 2, const_cast<void*>(data), dims, row_stride, box,
                                               element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed with error ", num(result));
  return map;
}

// Launches Kernel on the current stream as a persistent grid of clusters of `cluster` CTAs along x: as many clusters
// as fit on the device at once, but no more than `work` (its dynamic shared memory `smem` the same at every launch).
template <auto Kernel, typename... Args>
void launch_persistent_clusters(int cluster, int64_t work, unsigned block, size_t smem, Args&&... args) {
  cudaLaunchConfig_t config = launch_config(cluster, block, smem);
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  raise_smem_limit<Kernel>(smem);
  const int fit = per_device([&config](int) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, Kernel, &config));
    return n > 0 ? n : 1;
  });
  config.gridDim = dim3(static_cast<unsigned>(cluster * std::clamp<int64_t>(work, 1, fit)));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, Kernel, std::forward<Args>(args)...));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asynchronous copies from global to shared memory, committed in groups; wait<N> waits until at most N
// groups are in flight.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// 4 bytes, or zeros where `valid` is false (nothing read from src).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Descriptor of a K-major operand in shared memory with the 128-byte swizzle: rows of 128 bytes, 8-row groups
// 1024 bytes apart (the stride dimension); a k step inside the row advances the start by its bytes (16 at a time).
__device__ __forceinline__ uint64_t swizzle128_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across the asynchronous multiply.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// mbarriers in shared memory: `count` arrivals complete a phase (plus the bytes announced with expect_tx).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the copy engine (then a CTA barrier for the other threads).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives and announces `bytes` that bulk copies will complete on the barrier.
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier counts the phase before it, parity 1, as
// completed).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Bulk tensor copy of the box at (x, y) (x the inner coordinate) of a 2-d tensor map into shared memory, completing
// its bytes on `bar`. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}

// The copy above, multicast: the box lands at dst's offset in the shared memory of each CTA of the cluster in the
// mask `ctas` (bit i: rank i) and completes its bytes on the mbarrier at bar's offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const void* map, int x, int y, uint64_t* bar,
                                                      uint16_t ctas) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar)), "h"(ctas)
      : "memory");
}

// Clusters: the CTA's rank in its cluster, the cluster's index in the grid and the number of clusters.
__device__ __forceinline__ int cluster_rank() {
  uint32_t v;
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(v));
  return static_cast<int>(v);
}
__device__ __forceinline__ int cluster_index() {
  uint32_t v;
  asm("mov.u32 %0, %%clusterid.x;\n" : "=r"(v));
  return static_cast<int>(v);
}
__device__ __forceinline__ int cluster_count() {
  uint32_t v;
  asm("mov.u32 %0, %%nclusterid.x;\n" : "=r"(v));
  return static_cast<int>(v);
}
// A barrier of every thread of the cluster: what a thread wrote to shared memory before it (mbarrier initializations
// among them) is visible to the cluster's threads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrives on the mbarrier at bar's offset in the shared memory of the cluster's CTA of rank `rank`.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, int rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(rank)
      : "memory");
}

// Register reallocation between warpgroups (the kernel must have a register cap: __launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// A barrier among `threads` threads (a multiple of 32) other than the CTA's: id 1-15.
template <int ID, int THREADS>
__device__ __forceinline__ void named_barrier() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace lowbit
