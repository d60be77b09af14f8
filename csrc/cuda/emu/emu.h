// An emulation of CUDA's execution model on the CPU, for the tests: the CUDA sources of fusedbn
// (csrc/cuda/*.cu) compile with the host compiler against this header (-DFUSEDBN_EMU, included
// through csrc/cuda/launch.cuh) and their kernels run on CPU tensors.
//
// Model (emu_runtime.cpp has the scheduler and the detectors):
//  * a launch runs its blocks one after another, in an order shuffled by the seed; a block's
//    threads are cooperative fibers on the calling OS thread, switched only at __syncthreads,
//    warp shuffles and exit; after each barrier the fibers resume in an order shuffled by the seed;
//  * __syncthreads: every live (not exited) thread of the block must reach the same barrier (call
//    site), else the launch fails ("divergent barrier");
//  * warp shuffles: all lanes named in the mask (that exist in the block) must reach the same
//    shuffle with the same mask; a lane reading from a lane outside the mask or past the end of a
//    partial warp gets poison (all bytes 0xff: NaN for floating types, -1 for integers); a calling
//    lane missing from its own mask, a lane named in the mask that exited or waits elsewhere, or
//    lanes disagreeing on the mask fail the launch;
//  * shared memory (static: FUSEDBN_SHARED_ARRAY, dynamic: dynamic_shared_memory()) is one arena
//    per block, filled with 0xff bytes (NaN) at block start, each array followed by a red zone;
//    every access of the instrumented sources (-fsanitize=thread instrumentation, whose callbacks
//    emu_runtime.cpp provides) is checked against the red zones and, per byte, against the
//    accesses of other threads since the last barrier (race detector);
//  * a cooperative launch (launch_cooperative, launch.cuh) runs all blocks of its grid as
//    co-resident: each block has its own fibers and its own shared memory (with the red zones and
//    the race detector), and runs until all its live threads wait at the grid barrier
//    (FUSEDBN_GRID_SYNC) or have exited; when every thread of the grid waits there, all are
//    released (the blocks run in an order shuffled by the seed in every round). A grid larger
//    than sm_count x blocks_per_sm fails (cudaErrorCooperativeLaunchTooLarge), as do a grid
//    barrier in a normal launch, a thread that exits while others wait at the grid barrier (a
//    deadlock on the GPU) and threads waiting at different grid barriers. Memory is sequentially
//    consistent (global writes before the barrier are seen after it by every block, as
//    this_grid().sync() guarantees on the GPU; weaker orderings are not modelled);
//  * CUDA's launch limits are checked: grid and block dimensions, 1024 threads, the kernel's own
//    __launch_bounds__, static and dynamic shared memory (48 KB, dynamic up to 227 KB after
//    set_max_dynamic_shared_memory), kernel parameters (32764 bytes);
//  * SM count, occupancy (resident blocks per SM), the seed and forcing the 64-bit index kernels
//    are set by the tests (tests/emu_testing.py).
// Errors are raised as c10::Error ("fusedbn_emu: ...") by the launch that saw them.
#pragma once

#include <math.h>  // the float overloads of sqrt/exp/... in the global namespace, as in CUDA

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// __launch_bounds__(max_threads[, min_blocks]): the bound is carried into the compiled kernel as
// max_threads single-byte NOPs at its entry (patchable_function_entry, the one value-carrying
// function attribute GCC keeps on function templates; a section attribute is dropped there), and
// run_launch counts them (launch_bound(), x86-64 and AArch64) to fail a launch of more threads
// per block, as the GPU does ("too many resources requested for launch"). "+ 0" makes GCC fold a
// constexpr bound such as kBlockThreads (it fails on the bare name); emu.ld drops the table of
// patch areas GCC also emits (it breaks the link of a kernel instantiated in two objects). The
// NOPs cost nothing next to a fiber switch. The min-blocks argument only guides register
// allocation on the GPU: not modelled.
#define __launch_bounds__(max_threads, ...) \
  __attribute__((patchable_function_entry((max_threads) + 0, 0)))
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Static shared memory is declared with FUSEDBN_SHARED_ARRAY (csrc/cuda/launch.cuh), dynamic
// shared memory is reached with dynamic_shared_memory(): the emulator gives every block its own.
#define __shared__ \
  static_assert(false, "fusedbn emu: declare shared memory with FUSEDBN_SHARED_ARRAY")

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef struct CUstream_st* cudaStream_t;

// Set by the scheduler before it resumes a fiber.
extern __attribute__((visibility("hidden"))) uint3 threadIdx;
extern __attribute__((visibility("hidden"))) uint3 blockIdx;
extern __attribute__((visibility("hidden"))) dim3 blockDim;
extern __attribute__((visibility("hidden"))) dim3 gridDim;

namespace fusedbn_emu {

// ---- configuration (tests/emu_testing.py) ------------------------------------------------------
int sm_count();
int blocks_per_sm(const void* kernel, int threads, size_t smem);
bool index64_forced();
bool persistent_disabled();                // test seam: the streaming paths only
size_t max_dynamic_shared_memory();        // the opt-in maximum (227 KB, sm_90)
int64_t max_co_resident_threads();         // what a cooperative launch may hold (fibers)
void set_max_dynamic_shared_memory(const void* kernel, int bytes);
// The max_threads of the kernel's __launch_bounds__, or 0 when it declares none.
int launch_bound(const void* kernel);

// ---- device side -------------------------------------------------------------------------------
void syncthreads(const char* file, int line);
// The grid-wide barrier (cooperative_groups::this_grid().sync()): only in a cooperative launch.
void grid_sync(const char* file, int line);
enum class ShflKind : int { kIdx = 0, kUp, kDown, kXor, kSyncWarp };
uint64_t shfl_bits(ShflKind kind, const char* file, int line, unsigned mask, uint64_t bits,
                   int lane_arg, int width);
unsigned char* dynamic_shared_memory();
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name);
void check_vector_access(const void* p, size_t bytes, size_t align, const char* what);

template <typename T>
T shfl(ShflKind kind, const char* file, int line, unsigned mask, T v, int lane_arg,
       int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "fusedbn emu: shuffles move 1 to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t r = shfl_bits(kind, file, line, mask, bits, lane_arg, width);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// ---- host side ---------------------------------------------------------------------------------
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

using BlockBody = void (*)(void* ctx);
// Runs the grid: checks the limits, then every block's threads as fibers running body(ctx).
void run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, size_t param_bytes,
                BlockBody body, void* ctx);

// The same for cudaLaunchCooperativeKernel: every block of the grid co-resident (each with its
// own fibers and shared memory), switched at the grid barrier; a grid larger than SMs x resident
// blocks per SM fails as CUDA's cudaErrorCooperativeLaunchTooLarge.
void run_cooperative_launch(const void* kernel, dim3 grid, dim3 block, size_t smem,
                            size_t param_bytes, BlockBody body, void* ctx);

template <bool kCooperative, typename... Params, typename... Args>
void launch_as(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  // The arguments converted to the parameter types once, as the CUDA launch does; every thread
  // gets its own copy of the by-value parameters (std::apply passes the stored values).
  using Stored = std::tuple<std::decay_t<Params>...>;
  struct Ctx {
    void (*kernel)(Params...);
    Stored params;
  };
  Ctx ctx{kernel, Stored(std::forward<Args>(args)...)};
  (kCooperative ? run_cooperative_launch : run_launch)(
      reinterpret_cast<const void*>(kernel), grid, block, smem, sizeof(Stored),
      [](void* p) {
        Ctx* c = static_cast<Ctx*>(p);
        std::apply(c->kernel, c->params);
      },
      &ctx);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
            Args&&... args) {
  launch_as<false>(kernel, grid, block, smem, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t, Args&&... args) {
  launch_as<true>(kernel, grid, block, smem, std::forward<Args>(args)...);
}

// ---- the op wrapper of the emulated op library ------------------------------------------------
// Every op call runs inside an OpScope: fresh CPU allocations are filled with 0xff bytes (NaN) and
// surrounded by poisoned guard zones (checked when the op returns and when they are freed); the
// tensor arguments are copied into such allocations (same sizes, strides and storage offset, the
// storage's bytes outside the view poisoned), so that a read past a tensor reads NaN; an argument
// the op writes that it may not (bit not set in `mutating`) fails the op, one it may is copied
// back.
class OpScope {
 public:
  OpScope();
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  // The guarded copy of argument `index`; `mutating`: the op may write it (copied back).
  at::Tensor guard_copy(const at::Tensor& t, int index, bool mutating);
  // Checks the guard zones and the arguments, copies the mutated ones back; throws on an error.
  void finish(const char* op);

 private:
  struct Impl;
  Impl* impl_;
};

template <typename T>
struct GuardArg {
  static T copy(OpScope&, const T& v, int, bool) { return v; }
};
template <>
struct GuardArg<at::Tensor> {
  static at::Tensor copy(OpScope& s, const at::Tensor& t, int i, bool m) {
    return s.guard_copy(t, i, m);
  }
};
template <>
struct GuardArg<c10::optional<at::Tensor>> {
  static c10::optional<at::Tensor> copy(OpScope& s, const c10::optional<at::Tensor>& t, int i,
                                        bool m) {
    if (!t.has_value()) return t;
    return s.guard_copy(*t, i, m);
  }
};

template <class F, F f, unsigned mutating>
struct OpWrap;

template <class R, class... A, R (*f)(A...), unsigned mutating>
struct OpWrap<R (*)(A...), f, mutating> {
  template <size_t... I>
  static R call_impl(std::index_sequence<I...>, const std::decay_t<A>&... a) {
    OpScope scope;
    std::tuple<std::decay_t<A>...> args(GuardArg<std::decay_t<A>>::copy(
        scope, a, static_cast<int>(I), ((mutating >> I) & 1u) != 0)...);
    if constexpr (std::is_void<R>::value) {
      std::apply(f, args);
      scope.finish(__PRETTY_FUNCTION__);
    } else {
      R r = std::apply(f, args);
      scope.finish(__PRETTY_FUNCTION__);
      return r;
    }
  }
  static R call(A... a) { return call_impl(std::index_sequence_for<A...>{}, a...); }
};

}  // namespace fusedbn_emu

#define FUSEDBN_EMU_SHARED_ARRAY(align, type, name, count)                               \
  type(&name)[count] = *reinterpret_cast<type(*)[count]>(::fusedbn_emu::static_shared( \
      [] {                                                                               \
        static const char fusedbn_emu_tag = 0;                                           \
        return static_cast<const void*>(&fusedbn_emu_tag);                               \
      }(),                                                                               \
      sizeof(type[count]), align, #name))

#define __syncthreads() ::fusedbn_emu::syncthreads(__FILE__, __LINE__)
#define FUSEDBN_EMU_GRID_SYNC() ::fusedbn_emu::grid_sync(__FILE__, __LINE__)
#define __syncwarp(mask) \
  ((void)::fusedbn_emu::shfl_bits(::fusedbn_emu::ShflKind::kSyncWarp, __FILE__, __LINE__, \
                                  (mask), 0, 0, 32))
#define __shfl_sync(mask, ...) \
  ::fusedbn_emu::shfl(::fusedbn_emu::ShflKind::kIdx, __FILE__, __LINE__, (mask), __VA_ARGS__)
#define __shfl_up_sync(mask, ...) \
  ::fusedbn_emu::shfl(::fusedbn_emu::ShflKind::kUp, __FILE__, __LINE__, (mask), __VA_ARGS__)
#define __shfl_down_sync(mask, ...) \
  ::fusedbn_emu::shfl(::fusedbn_emu::ShflKind::kDown, __FILE__, __LINE__, (mask), __VA_ARGS__)
#define __shfl_xor_sync(mask, ...) \
  ::fusedbn_emu::shfl(::fusedbn_emu::ShflKind::kXor, __FILE__, __LINE__, (mask), __VA_ARGS__)

// ---- intrinsics and the device math the sources use --------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fdividef(float a, float b) { return a / b; }  // the GPU's is approximate
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }    // the GPU's is approximate
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return ::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }  // never contracted into an FMA
inline double __dmul_rn(double a, double b) { return a * b; }

#define FUSEDBN_EMU_MINMAX(T)                           \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
FUSEDBN_EMU_MINMAX(int)
FUSEDBN_EMU_MINMAX(unsigned)
FUSEDBN_EMU_MINMAX(long)
FUSEDBN_EMU_MINMAX(unsigned long)
FUSEDBN_EMU_MINMAX(long long)
FUSEDBN_EMU_MINMAX(unsigned long long)
#undef FUSEDBN_EMU_MINMAX
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }
