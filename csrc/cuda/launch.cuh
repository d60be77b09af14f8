// The seam between fusedbn's CUDA sources and the CUDA runtime. Every kernel launch and every
// runtime query of csrc/cuda/ goes through this header, so that the very same sources compile two
// ways:
//  * by nvcc (the real build): launch_kernel is the triple-chevron launch followed by
//    C10_CUDA_KERNEL_LAUNCH_CHECK, the queries ask the CUDA runtime;
//  * by the host compiler with -DFUSEDBN_EMU (the emulated build of the test suite,
//    csrc/cuda/emu/): launch_kernel runs the grid on the CPU under an emulation of CUDA's
//    execution model, the queries return what the tests configured.
//
//   launch_kernel(kernel, grid, block, smem, stream, args...)   launch + launch check
//   launch_cooperative(kernel, grid, block, smem, stream, args...)
//                                      cooperative launch (all blocks co-resident, the grid
//                                      barrier allowed); false, launching nothing, when the grid
//                                      cannot be co-resident (the caller falls back)
//   cooperative_capacity(kernel, threads, smem, device)         blocks that can be co-resident
//   FUSEDBN_GRID_SYNC()                                         grid-wide barrier (device side,
//                                                               cooperative launches only)
//   current_stream()                                            the current stream
//   DeviceGuard guard(tensor.device())                          device guard
//   sm_count(device), blocks_per_sm(kernel, threads, smem)      grid sizing
//   index64_forced()                                            test seam: 64-bit index kernels
//   set_max_dynamic_shared_memory(kernel, bytes)                opt-in above 48 KB
//   FUSEDBN_SHARED_ARRAY(align, type, name, count)              static shared memory of a kernel
//   dynamic_shared_memory()                                     the launch's dynamic shared memory
//   FUSEDBN_LIBRARY_IMPL(m), FUSEDBN_CUDA_FN(f)                 registration of the CUDA kernels
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#if defined(FUSEDBN_EMU)
#include "emu/emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#endif

namespace fusedbn {
namespace cuda {

#if !defined(FUSEDBN_EMU)

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Streaming multiprocessors of `device`, queried once per device.
inline int sm_count(int device) {
  constexpr int kCached = 256;
  static std::atomic<int> cache[kCached] = {};
  if (device >= 0 && device < kCached) {
    int n = cache[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  n = std::max(n, 1);
  if (device >= 0 && device < kCached) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// Resident blocks per SM of `kernel` for `threads` threads and `smem` bytes of dynamic shared
// memory on the current device (at least 1), queried once per (kernel, device, threads, smem).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, threads, smem);
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &n, reinterpret_cast<const void*>(kernel), threads, smem));
  n = std::max(n, 1);
  const std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, n);
  return n;
}

// The real build never forces the 64-bit index kernels (the emulated build can, for tests).
constexpr bool index64_forced() { return false; }
// Nor turns the persistent paths off (the emulated build can, to test the streaming ones).
constexpr bool persistent_disabled() { return false; }

// The most dynamic shared memory a block of `device` may opt in to (227 KB on sm_90).
inline size_t max_dynamic_shared_memory(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(std::max(n, 0));
}

template <typename Kernel>
void set_max_dynamic_shared_memory(Kernel kernel, int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// The launch of every fusedbn kernel: kernel<<<grid, block, smem, stream>>>(args...), then the
// launch check.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of `kernel` (threads per block, dynamic shared memory) that can be resident at once on
// `device`: SMs x resident blocks per SM (the occupancy API), 0 where the device cannot launch
// cooperatively.
template <typename Kernel>
int64_t cooperative_capacity(Kernel kernel, int threads, size_t smem, int device) {
  constexpr int kCached = 256;
  static std::atomic<int> supported[kCached] = {};  // 0 unknown, 1 yes, 2 no
  int s = device >= 0 && device < kCached ? supported[device].load(std::memory_order_relaxed) : 0;
  if (s == 0) {
    int attr = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&attr, cudaDevAttrCooperativeLaunch, device));
    s = attr != 0 ? 1 : 2;
    if (device >= 0 && device < kCached) supported[device].store(s, std::memory_order_relaxed);
  }
  if (s != 1) return 0;
  return int64_t{sm_count(device)} * blocks_per_sm(kernel, threads, smem);
}

// cudaLaunchCooperativeKernel(kernel, grid, block, args, smem, stream) for a grid whose blocks can
// all be resident (checked with the occupancy API first), then the launch check; returns false
// and launches nothing when they cannot (the caller takes another path). The grid barrier
// (FUSEDBN_GRID_SYNC: cooperative_groups::this_grid().sync()) needs no relocatable device code
// since CUDA 11.
template <typename... Params, typename... Args>
bool launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, Args&&... args) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (blocks > cooperative_capacity(kernel, threads, smem, device)) return false;
  // The arguments converted to the parameter types, as a triple-chevron launch does.
  std::tuple<std::decay_t<Params>...> stored(std::forward<Args>(args)...);
  void* argv[sizeof...(Params) > 0 ? sizeof...(Params) : 1] = {};
  std::apply(
      [&argv](auto&... p) {
        int i = 0;
        ((argv[i++] = static_cast<void*>(&p)), ...);
        (void)i;
      },
      stored);
  const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid,
                                                      block, argv, smem, stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the caller falls back
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

#if defined(__CUDACC__)
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
#endif
#define FUSEDBN_GRID_SYNC() ::fusedbn::cuda::grid_sync()

// Dynamic shared memory of the running launch (the `smem` bytes of launch_kernel), 16-byte
// aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char fusedbn_smem[];
  return fusedbn_smem;
}

#define FUSEDBN_SHARED_ARRAY(align, type, name, count) __shared__ __align__(align) type name[count]

#define FUSEDBN_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fusedbn, CUDA, m)
#define FUSEDBN_CUDA_FN(f) TORCH_FN(f)
#define FUSEDBN_CUDA_FN_MUTATING(f, args) TORCH_FN(f)

#else  // FUSEDBN_EMU: the emulation of csrc/cuda/emu/ fills the seam

using DeviceGuard = ::fusedbn_emu::DeviceGuard;

inline cudaStream_t current_stream() { return nullptr; }

inline int sm_count(int /*device*/) { return ::fusedbn_emu::sm_count(); }

template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  return ::fusedbn_emu::blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem);
}

inline bool index64_forced() { return ::fusedbn_emu::index64_forced(); }
inline bool persistent_disabled() { return ::fusedbn_emu::persistent_disabled(); }
inline size_t max_dynamic_shared_memory(int /*device*/) {
  return ::fusedbn_emu::max_dynamic_shared_memory();
}

template <typename Kernel>
void set_max_dynamic_shared_memory(Kernel kernel, int bytes) {
  ::fusedbn_emu::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  ::fusedbn_emu::launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// The GPU's answer, and at most what the emulator can hold co-resident (its fibers).
template <typename Kernel>
int64_t cooperative_capacity(Kernel kernel, int threads, size_t smem, int /*device*/) {
  return std::min<int64_t>(int64_t{::fusedbn_emu::sm_count()} * blocks_per_sm(kernel, threads, smem),
                           ::fusedbn_emu::max_co_resident_threads() / std::max(threads, 1));
}

template <typename... Params, typename... Args>
bool launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, Args&&... args) {
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (blocks > cooperative_capacity(kernel, threads, smem, 0)) return false;
  ::fusedbn_emu::launch_cooperative(kernel, grid, block, smem, stream,
                                    std::forward<Args>(args)...);
  return true;
}

#define FUSEDBN_GRID_SYNC() FUSEDBN_EMU_GRID_SYNC()

inline unsigned char* dynamic_shared_memory() { return ::fusedbn_emu::dynamic_shared_memory(); }

#define FUSEDBN_SHARED_ARRAY(align, type, name, count) \
  FUSEDBN_EMU_SHARED_ARRAY(align, type, name, count)

// FUSEDBN_OP_NAMESPACE: the emulated op library's namespace (fusedbn_emu), on the CPU key.
#define FUSEDBN_LIBRARY_IMPL_NS(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
#define FUSEDBN_LIBRARY_IMPL(m) FUSEDBN_LIBRARY_IMPL_NS(FUSEDBN_OP_NAMESPACE, m)
#define FUSEDBN_CUDA_FN(f) TORCH_FN((::fusedbn_emu::OpWrap<decltype(&f), &f, 0u>::call))
// args: a bit mask of the tensor arguments the op writes in place (bit i: argument i).
#define FUSEDBN_CUDA_FN_MUTATING(f, args) \
  TORCH_FN((::fusedbn_emu::OpWrap<decltype(&f), &f, (args)>::call))

#endif

}  // namespace cuda
}  // namespace fusedbn
