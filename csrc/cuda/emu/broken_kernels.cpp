// Deliberately broken kernels, one per detector of the CUDA emulation, and two correct ones as
// controls; tests/test_cuda_emu_detectors.py launches each (run_broken_kernel) and asserts the
// error the emulator raises or the values the kernel returns. Written as CUDA source against the
// project's seam (launch.cuh), compiled only by the emulated build.
#include <ATen/ops/empty.h>

#include <climits>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "../bn_reduce_kernels.cuh"
#include "../bn_utils.cuh"
#include "../launch.cuh"
#include "emu_runtime.h"

namespace fusedbn {
namespace cuda {
namespace broken {

// Control: a block sum over shared memory and shuffles, correctly synchronized.
__global__ void __launch_bounds__(256) block_sum_kernel(const float* in, float* out, int n) {
  FUSEDBN_SHARED_ARRAY(16, float, partial, 8);
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = t < n ? in[t] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Two threads write the same shared word between two barriers.
__global__ void write_race_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 32);
  s[threadIdx.x / 2] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

// The barrier between the write and the neighbour's read is missing.
__global__ void missing_barrier_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 64);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Half the block waits at one barrier, half at another.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Every lane calls the shuffle, but the mask names lanes 0..15 only.
__global__ void shfl_mask_missing_caller_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 1);
}

// The mask names the whole warp, but lanes 16..31 return before the shuffle.
__global__ void shfl_mask_exited_lane_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Lanes 0..15 and 16..31 disagree on the mask of one shuffle.
__global__ void shfl_mask_disagree_kernel(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_down_sync(mask, static_cast<float>(threadIdx.x), 1);
}

// A 48-thread block: the second warp has 16 lanes, and shfl_down by 8 makes lanes 8..15 read
// lanes 16..23, which do not exist: they get poison (NaN).
__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 8);
}

// Writes one element past a static shared array through a pointer (the red zone catches it).
__global__ void static_overrun_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 64);
  float* p = s;
  p[threadIdx.x] = 1.0f;  // launched with 65 threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 64];
}

// The same write indexing the array itself: UBSan's bounds check sees the array type.
__global__ void static_overrun_indexed_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 64);
  s[threadIdx.x] = 1.0f;  // launched with 65 threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 64];
}

// Reads one element past the dynamic shared memory of the launch.
__global__ void dynamic_overrun_kernel(float* out, int n) {
  float* s = reinterpret_cast<float*>(dynamic_shared_memory());
  s[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1 < n ? threadIdx.x + 1 : n];  // s[n]: one past the end
}

// Uses shared memory nobody wrote: reads the poison (NaN).
__global__ void uninitialized_shared_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 32);
  if (threadIdx.x > 0) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[0];
}

// A 16-byte vector load from an address that is 4-byte aligned only.
__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const Vec<float, 4> v = load_vec<float, 4>(in + 1);
  out[threadIdx.x] = v.v[0];
}

// The same load without the project's helper: UBSan's alignment check catches it.
__global__ void misaligned_ubsan_kernel(const float* in, float* out) {
  const Vec<float, 4>* p = reinterpret_cast<const Vec<float, 4>*>(in + 1);
  out[threadIdx.x] = p->v[1];
}

// Signed 32-bit index overflow (UBSan).
__global__ void index_overflow_kernel(float* out, int base) {
  const int i = base + static_cast<int>(threadIdx.x);  // base = INT_MAX
  out[threadIdx.x] = static_cast<float>(i & 1);
}

// A kernel whose result depends on the order of its threads (all write one global word): no
// shared memory involved, so only two seeds disagreeing show it.
__global__ void order_dependent_kernel(float* out) { out[0] = static_cast<float>(threadIdx.x); }

__global__ void big_static_shared_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 16 * 1024);  // 64 KB: more than CUDA's 48 KB
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void dynamic_shared_kernel(float* out) {
  float* s = reinterpret_cast<float*>(dynamic_shared_memory());
  s[threadIdx.x] = 3.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

// Declares at most 128 threads per block (a constexpr bound in a function template, as fusedbn's
// kernels declare kBlockThreads); launched with 256 it must fail, with 128 it runs.
constexpr int kSmallBound = 128;
template <int V>
__global__ void __launch_bounds__(kSmallBound, 2) bounded_kernel(float* out) {
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  out[t] = static_cast<float>(V * t);
}

__global__ void noop_kernel(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.0f;
}

// Element-wise kernels over a float tensor of n elements (one thread per element).
__global__ void write_even_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && i % 2 == 0) out[i] = 1.0f;
}
__global__ void shift_read_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i + 1];  // the last element reads one past the end
}
__global__ void shift_write_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i + 1] = 1.0f;  // the last element writes one past the end
}
__global__ void write_input_kernel(float* in) {
  if (threadIdx.x == 0) in[0] = 42.0f;
}


// ---- cooperative launches and the grid barrier --------------------------------------------
// Control: every block sums its part of `in` (shared memory + a barrier), writes the sum to
// global memory, waits at the grid barrier, then reads every block's sum. Each block also keeps
// its own index in static and dynamic shared memory across the grid barrier: out[2 * b + 1] is 1
// when both still hold it (shared memory is private per block). out[2 * b] = the grid's total.
__global__ void __launch_bounds__(64) grid_exchange_kernel(const float* in, float* sums,
                                                           float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, part, 64);
  FUSEDBN_SHARED_ARRAY(16, int, mine, 1);
  int* dyn = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = threadIdx.x, b = blockIdx.x;
  part[t] = in[b * 64 + t];
  if (t == 0) {
    mine[0] = b;
    dyn[0] = 1000 + b;
  }
  __syncthreads();
  if (t == 0) {
    float s = 0.0f;
    for (int i = 0; i < 64; ++i) s += part[i];
    sums[b] = s;
  }
  FUSEDBN_GRID_SYNC();
  if (t == 0) {
    float total = 0.0f;
    for (int i = 0; i < static_cast<int>(gridDim.x); ++i) total += sums[i];
    out[2 * b] = total;
    out[2 * b + 1] = mine[0] == b && dyn[0] == 1000 + b ? 1.0f : 0.0f;
  }
}

// A grid barrier in a kernel launched normally.
__global__ void grid_sync_kernel(float* out) {
  FUSEDBN_GRID_SYNC();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Thread 5 of block 1 returns before the grid barrier that the others wait at.
__global__ void grid_sync_thread_exits_kernel(float* out) {
  if (blockIdx.x == 1 && threadIdx.x == 5) return;
  FUSEDBN_GRID_SYNC();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Block 2 returns before the grid barrier that the other blocks wait at.
__global__ void grid_sync_block_exits_kernel(float* out) {
  if (blockIdx.x == 2) return;
  FUSEDBN_GRID_SYNC();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Even and odd blocks wait at different grid barriers.
__global__ void grid_sync_divergent_kernel(float* out) {
  if (blockIdx.x % 2 == 0) {
    FUSEDBN_GRID_SYNC();
  } else {
    FUSEDBN_GRID_SYNC();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Within block 0, thread 0 waits at __syncthreads while the others wait at the grid barrier.
__global__ void grid_sync_vs_syncthreads_kernel(float* out) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    __syncthreads();
  } else {
    FUSEDBN_GRID_SYNC();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// A shared-memory race in one block of a cooperative launch (after a grid barrier).
__global__ void grid_race_kernel(float* out) {
  FUSEDBN_SHARED_ARRAY(16, float, s, 32);
  FUSEDBN_GRID_SYNC();
  if (blockIdx.x == 3) s[threadIdx.x / 2] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = blockIdx.x == 3 ? s[threadIdx.x % 16] : 0.0f;
}

using Runner = std::function<std::vector<float>()>;
using TensorRunner = std::function<at::Tensor(const at::Tensor&)>;

// As an op of the emulated library runs them: inside an OpScope, the input guarded.
const std::map<std::string, TensorRunner>& tensor_runners() {
  static const std::map<std::string, TensorRunner> m = {
      {"unwritten_output",
       [](const at::Tensor& x) {
         ::fusedbn_emu::OpScope scope;
         const int n = static_cast<int>(x.numel());
         at::Tensor out = at::empty({n}, x.options());
         launch_kernel(write_even_kernel, ceil_div(n, 32), 32, 0, current_stream(),
                       out.data_ptr<float>(), n);
         scope.finish("unwritten_output");
         return out;
       }},
      {"read_past_end",
       [](const at::Tensor& x) {
         ::fusedbn_emu::OpScope scope;
         const at::Tensor xc = scope.guard_copy(x, 0, false);
         const int n = static_cast<int>(x.numel());
         at::Tensor out = at::empty({n}, x.options());
         launch_kernel(shift_read_kernel, ceil_div(n, 32), 32, 0, current_stream(),
                       static_cast<const float*>(xc.data_ptr<float>()), out.data_ptr<float>(),
                       n);
         scope.finish("read_past_end");
         return out;
       }},
      {"write_past_end",
       [](const at::Tensor& x) {
         ::fusedbn_emu::OpScope scope;
         const int n = static_cast<int>(x.numel());
         at::Tensor out = at::empty({n}, x.options());
         launch_kernel(shift_write_kernel, ceil_div(n, 32), 32, 0, current_stream(),
                       out.data_ptr<float>(), n);
         scope.finish("write_past_end");
         return out;
       }},
      {"write_input",
       [](const at::Tensor& x) {
         ::fusedbn_emu::OpScope scope;
         at::Tensor xc = scope.guard_copy(x, 0, false);
         launch_kernel(write_input_kernel, 1, 32, 0, current_stream(), xc.data_ptr<float>());
         scope.finish("write_input");
         return xc;
       }},
  };
  return m;
}

const std::map<std::string, Runner>& runners() {
  static const std::map<std::string, Runner> m = {
      {"grid_exchange_ok",
       [] {
         // 6 blocks of 64 threads on 3 SMs x 2 resident blocks: exactly co-resident.
         const int blocks = 6;
         std::vector<float> in(blocks * 64), sums(blocks, 0.0f), out(2 * blocks, -1.0f);
         for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 97);
         ::fusedbn_emu::Config saved = ::fusedbn_emu::config();
         ::fusedbn_emu::config().sm_count = 3;
         ::fusedbn_emu::config().blocks_per_sm = 2;
         bool ok = false;
         try {
           ok = launch_cooperative(grid_exchange_kernel, blocks, 64, 16, current_stream(),
                                   static_cast<const float*>(in.data()), sums.data(), out.data());
         } catch (...) {
           ::fusedbn_emu::config() = saved;
           throw;
         }
         ::fusedbn_emu::config() = saved;
         if (!ok) return std::vector<float>{};
         return out;
       }},
      // launch_cooperative (the seam) refuses a grid that cannot be co-resident: 1 when a
      // grid of sm_count x blocks_per_sm blocks launched, 0 when one block more was refused.
      {"cooperative_refused",
       [] {
         ::fusedbn_emu::Config saved = ::fusedbn_emu::config();
         ::fusedbn_emu::config().sm_count = 2;
         ::fusedbn_emu::config().blocks_per_sm = 2;
         std::vector<float> out(5 * 32, 0.0f), r;
         try {
           r.push_back(launch_cooperative(grid_sync_kernel, 4, 32, 0, current_stream(),
                                          out.data()) ? 1.0f : 0.0f);
           r.push_back(launch_cooperative(grid_sync_kernel, 5, 32, 0, current_stream(),
                                          out.data()) ? 1.0f : 0.0f);
         } catch (...) {
           ::fusedbn_emu::config() = saved;
           throw;
         }
         ::fusedbn_emu::config() = saved;
         return r;
       }},
      // The emulator's own check, as cudaLaunchCooperativeKernel's, past the seam's.
      {"cooperative_too_large",
       [] {
         ::fusedbn_emu::Config saved = ::fusedbn_emu::config();
         ::fusedbn_emu::config().sm_count = 2;
         ::fusedbn_emu::config().blocks_per_sm = 2;
         std::vector<float> out(5 * 32, 0.0f);
         try {
           ::fusedbn_emu::launch_cooperative(grid_sync_kernel, 5, 32, 0, current_stream(),
                                             out.data());
         } catch (...) {
           ::fusedbn_emu::config() = saved;
           throw;
         }
         ::fusedbn_emu::config() = saved;
         return out;
       }},
      {"grid_sync_not_cooperative",
       [] {
         std::vector<float> out(4 * 32);
         launch_kernel(grid_sync_kernel, 4, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"grid_sync_thread_exits",
       [] {
         std::vector<float> out(4 * 32);
         launch_cooperative(grid_sync_thread_exits_kernel, 4, 32, 0, current_stream(),
                            out.data());
         return out;
       }},
      {"grid_sync_block_exits",
       [] {
         std::vector<float> out(4 * 32);
         launch_cooperative(grid_sync_block_exits_kernel, 4, 32, 0, current_stream(),
                            out.data());
         return out;
       }},
      {"grid_sync_divergent",
       [] {
         std::vector<float> out(4 * 32);
         launch_cooperative(grid_sync_divergent_kernel, 4, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"grid_sync_vs_syncthreads",
       [] {
         std::vector<float> out(4 * 32);
         launch_cooperative(grid_sync_vs_syncthreads_kernel, 4, 32, 0, current_stream(),
                            out.data());
         return out;
       }},
      {"grid_race",
       [] {
         std::vector<float> out(4 * 32);
         launch_cooperative(grid_race_kernel, 4, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"block_sum_ok",
       [] {
         std::vector<float> in(256), out(1, 0.0f);
         for (int i = 0; i < 256; ++i) in[i] = static_cast<float>(i);
         launch_kernel(block_sum_kernel, 1, 256, 0, current_stream(), in.data(), out.data(),
                       256);
         return out;
       }},
      {"launch_bounds_exceeded",
       [] {
         std::vector<float> out(256);
         launch_kernel(bounded_kernel<2>, 1, 256, 0, current_stream(), out.data());
         return out;
       }},
      {"launch_bounds_ok",
       [] {
         std::vector<float> out(128);
         launch_kernel(bounded_kernel<2>, 1, dim3(64, 2), 0, current_stream(), out.data());
         return out;
       }},
      // The bounds the emulator reads: a kernel without one (0), the test kernel (128), and
      // fusedbn's reduction kernel of the real sources (kBlockThreads).
      {"launch_bounds_read",
       [] {
         return std::vector<float>{
             static_cast<float>(::fusedbn_emu::launch_bound(
                 reinterpret_cast<const void*>(noop_kernel))),
             static_cast<float>(::fusedbn_emu::launch_bound(
                 reinterpret_cast<const void*>(bounded_kernel<3>))),
             static_cast<float>(::fusedbn_emu::launch_bound(reinterpret_cast<const void*>(
                 reduce_planes_kernel<WelfordOp<float>, 4, int32_t>)))};
       }},
      {"write_race",
       [] {
         std::vector<float> out(64);
         launch_kernel(write_race_kernel, 1, 64, 0, current_stream(), out.data());
         return out;
       }},
      {"missing_barrier",
       [] {
         std::vector<float> out(64);
         launch_kernel(missing_barrier_kernel, 1, 64, 0, current_stream(), out.data());
         return out;
       }},
      {"divergent_barrier",
       [] {
         std::vector<float> out(32);
         launch_kernel(divergent_barrier_kernel, 1, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"shfl_mask_missing_caller",
       [] {
         std::vector<float> out(32);
         launch_kernel(shfl_mask_missing_caller_kernel, 1, 32, 0, current_stream(),
                       out.data());
         return out;
       }},
      {"shfl_mask_exited_lane",
       [] {
         std::vector<float> out(32);
         launch_kernel(shfl_mask_exited_lane_kernel, 1, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"shfl_mask_disagree",
       [] {
         std::vector<float> out(32);
         launch_kernel(shfl_mask_disagree_kernel, 1, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"partial_warp",
       [] {
         std::vector<float> out(48);
         launch_kernel(partial_warp_kernel, 1, 48, 0, current_stream(), out.data());
         return out;
       }},
      {"static_overrun",
       [] {
         std::vector<float> out(65);
         launch_kernel(static_overrun_kernel, 1, 65, 0, current_stream(), out.data());
         return out;
       }},
      {"static_overrun_indexed",
       [] {
         std::vector<float> out(65);
         launch_kernel(static_overrun_indexed_kernel, 1, 65, 0, current_stream(), out.data());
         return out;
       }},
      {"dynamic_overrun",
       [] {
         std::vector<float> out(32);
         launch_kernel(dynamic_overrun_kernel, 1, 32, 32 * sizeof(float), current_stream(),
                       out.data(), 32);
         return out;
       }},
      {"uninitialized_shared",
       [] {
         std::vector<float> out(32);
         launch_kernel(uninitialized_shared_kernel, 1, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"misaligned_vector",
       [] {
         alignas(16) float in[8] = {0, 1, 2, 3, 4, 5, 6, 7};
         std::vector<float> out(1);
         launch_kernel(misaligned_vector_kernel, 1, 1, 0, current_stream(),
                       static_cast<const float*>(in), out.data());
         return out;
       }},
      {"misaligned_ubsan",
       [] {
         alignas(16) float in[8] = {0, 1, 2, 3, 4, 5, 6, 7};
         std::vector<float> out(1);
         launch_kernel(misaligned_ubsan_kernel, 1, 1, 0, current_stream(),
                       static_cast<const float*>(in), out.data());
         return out;
       }},
      {"index_overflow",
       [] {
         std::vector<float> out(2);
         launch_kernel(index_overflow_kernel, 1, 2, 0, current_stream(), out.data(), INT_MAX);
         return out;
       }},
      {"order_dependent",
       [] {
         std::vector<float> out(1);
         launch_kernel(order_dependent_kernel, 1, 256, 0, current_stream(), out.data());
         return out;
       }},
      {"grid_y_too_large",
       [] {
         std::vector<float> out(1);
         launch_kernel(noop_kernel, dim3(1, 65536), 1, 0, current_stream(), out.data());
         return out;
       }},
      {"too_many_threads",
       [] {
         std::vector<float> out(1);
         launch_kernel(noop_kernel, 1, dim3(32, 33), 0, current_stream(), out.data());
         return out;
       }},
      {"block_z_too_large",
       [] {
         std::vector<float> out(1);
         launch_kernel(noop_kernel, 1, dim3(1, 1, 65), 0, current_stream(), out.data());
         return out;
       }},
      {"zero_grid",
       [] {
         std::vector<float> out(1);
         launch_kernel(noop_kernel, 0, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"static_shared_too_large",
       [] {
         std::vector<float> out(32);
         launch_kernel(big_static_shared_kernel, 1, 32, 0, current_stream(), out.data());
         return out;
       }},
      {"dynamic_shared_without_opt_in",
       [] {
         std::vector<float> out(32);
         launch_kernel(dynamic_shared_kernel, 1, 32, 64 * 1024, current_stream(), out.data());
         return out;
       }},
      {"dynamic_shared_with_opt_in_ok",
       [] {
         std::vector<float> out(32);
         set_max_dynamic_shared_memory(dynamic_shared_kernel, 64 * 1024);
         launch_kernel(dynamic_shared_kernel, 1, 32, 64 * 1024, current_stream(), out.data());
         set_max_dynamic_shared_memory(dynamic_shared_kernel, 48 * 1024);
         return out;
       }},
      {"dynamic_shared_over_opt_in",
       [] {
         std::vector<float> out(32);
         set_max_dynamic_shared_memory(dynamic_shared_kernel, 64 * 1024);
         try {
           launch_kernel(dynamic_shared_kernel, 1, 32, 96 * 1024, current_stream(), out.data());
         } catch (...) {
           set_max_dynamic_shared_memory(dynamic_shared_kernel, 48 * 1024);
           throw;
         }
         return out;
       }},
  };
  return m;
}

}  // namespace broken
}  // namespace cuda
}  // namespace fusedbn

namespace fusedbn_emu {

std::vector<std::string> broken_kernel_names() {
  std::vector<std::string> names;
  for (const auto& kv : fusedbn::cuda::broken::runners()) names.push_back(kv.first);
  return names;
}

at::Tensor run_tensor_kernel(const std::string& name, const at::Tensor& x) {
  const auto& m = fusedbn::cuda::broken::tensor_runners();
  const auto it = m.find(name);
  if (it == m.end()) throw_error("no tensor kernel named '" + name + "'");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(),
              "run_tensor_kernel: x must be a contiguous 1-D float32 tensor");
  return it->second(x);
}

std::vector<float> run_broken_kernel(const std::string& name) {
  const auto& m = fusedbn::cuda::broken::runners();
  const auto it = m.find(name);
  if (it == m.end()) throw_error("no broken kernel named '" + name + "'");
  return it->second();
}

}  // namespace fusedbn_emu
