// Paged optimizer states (torchlowbit/ops/paged_memory.py): CUDA managed memory, which the driver pages to
// the host when the device runs short, and an asynchronous prefetch to the device ahead of each use.
#include <torch/library.h>

#include <algorithm>

#include "lowbit_common.h"

namespace lowbit {

static void free_managed(void* ptr) { cudaFree(ptr); }  // a deleter must not throw: errors here are dropped

at::Tensor paged_empty_cuda(const at::Tensor& like, at::IntArrayRef size, at::ScalarType dtype) {
  for (int64_t n : size) TORCH_CHECK_VALUE(n >= 0, "size must have no negative entries, got ", shape_str(size));
  c10::cuda::CUDAGuard guard(like.device());
  const size_t bytes = std::max<size_t>(c10::multiply_integers(size) * c10::elementSize(dtype), 1);
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  return at::from_blob(ptr, size, free_managed, at::TensorOptions().dtype(dtype).device(like.device()));
}

void prefetch_cuda(const at::Tensor& t, bool to_device) {
  if (t.numel() == 0) return;
  cudaPointerAttributes attributes;
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, t.data_ptr()));
  if (attributes.type != cudaMemoryTypeManaged) return;  // ordinary device memory: nothing to move
  c10::cuda::CUDAGuard guard(t.device());
  const size_t bytes = t.numel() * t.element_size();
  auto stream = c10::cuda::getCurrentCUDAStream();
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = to_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  location.id = to_device ? t.get_device() : 0;
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, location, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, to_device ? t.get_device() : cudaCpuDeviceId, stream));
#endif
}

}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("paged_empty", TORCH_FN(lowbit::paged_empty_cuda));
  m.impl("prefetch_", TORCH_FN(lowbit::prefetch_cuda));
}
