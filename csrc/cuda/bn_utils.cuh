// Small pieces shared by every fusedbn CUDA file: aligned vector loads, the choice of vector width
// and index type, and ChannelPtr, a type-tagged pointer to a per-channel tensor. The runtime seam
// (launches, SM count, occupancy, stream, guard) is launch.cuh.
//
// ChannelPtr is how the per-channel kernels (C threads: statistics epilogues, eval parameters,
// running statistics) read and write weight/bias/running statistics/grad_weight of either the
// input's dtype or float32 without a template instantiation per dtype pair: the dtype switch runs
// once per channel, which costs nothing next to the element-wise passes. The bandwidth-bound
// kernels never see these tensors; they read per-channel coefficients prepared in the
// accumulation type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "launch.cuh"

namespace fusedbn {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;  // every bandwidth-bound kernel runs 256-thread blocks

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------
// Vector loads: 16 bytes per thread per load.

template <typename T>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));  // 4 float, 8 half/bfloat16, 2 double
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
#if defined(FUSEDBN_EMU)
  ::fusedbn_emu::check_vector_access(p, sizeof(Vec<T, V>), alignof(Vec<T, V>), "load_vec");
#endif
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
#if defined(FUSEDBN_EMU)
  ::fusedbn_emu::check_vector_access(p, sizeof(Vec<T, V>), alignof(Vec<T, V>), "store_vec");
#endif
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Stores v at p as one vector when `whole` (p aligned to the vector), else element by element
// (an output that sits differently in its 16-byte lines than the inputs the vectors follow).
template <typename T, int V>
__device__ __forceinline__ void store_vec_or_elems(T* p, const Vec<T, V>& v, bool whole) {
  if (whole) {
    store_vec<T, V>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = v.v[j];
  }
}

// Loads elements [lo, hi) of the V-element group at p; the others are left zero.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_partial(const T* p, int lo, int hi) {
  Vec<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = (j >= lo && j < hi) ? p[j] : static_cast<T>(0.0f);
  return r;
}

// The normalize map of the training forward, the mean split in two (bn_elementwise.cuh:
// coefficients hi, lo, s, b): ((x - hi) - lo) * s + b. The one place of it: channel_affine's
// AffineFn, the persistent forwards' AffineStore and act_forward_train's map (bn_act_ew.cuh).
template <typename acc_t>
__device__ __forceinline__ acc_t affine_split(acc_t x, const acc_t* p) {
  return ((x - p[0]) - p[1]) * p[2] + p[3];
}

// The training backward's dx map (bn_elementwise.cuh: coefficients k0, k1, k2, k3):
// (dy - k0) * k1 - (x - k2) * k3. Its one place: channel_grad's GradFn, the persistent
// backward's GradDxStore and act_backward's DxFromMaskFn.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_dx(acc_t dy, acc_t x, const acc_t* p) {
  return (dy - p[0]) * p[1] - (x - p[2]) * p[3];
}

inline bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Tensors of at most 2^30 elements use 32-bit index math; larger ones 64-bit. The headroom
// covers the kernels' intermediate values: a position plus a step (< 2 * numel) and indices a
// grid-stride step past the end.
// index64_forced(): a test seam of the emulated build (launch.cuh); always false on the GPU.
inline bool fits_int32(int64_t numel) {
  return numel <= (int64_t{1} << 30) && !index64_forced();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<index_t>{}) with index_t = int64_t when use64, else int32_t.
template <typename F>
void dispatch_index(bool use64, F&& f) {
  if (use64) {
    f(TypeTag<int64_t>{});
  } else {
    f(TypeTag<int32_t>{});
  }
}

// Calls f(std::integral_constant<int, V>{}) with V = vmax when vectorized, else 1.
template <int vmax, typename F>
void dispatch_vec(bool vectorized, F&& f) {
  if (vectorized) {
    f(std::integral_constant<int, vmax>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(std::integral_constant<int, V>{}) with V the largest of vmax, vmax/2, ..., 1 that is at
// most v (v: a power of two, widest_vec's answer).
template <int vmax, typename F>
void dispatch_vec_width(int v, F&& f) {
  if constexpr (vmax == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (v >= vmax) {
      f(std::integral_constant<int, vmax>{});
    } else {
      dispatch_vec_width<vmax / 2>(v, std::forward<F>(f));
    }
  }
}

// Position of p within its 16-byte line, in elements of elem_size bytes (p is elem-aligned).
inline int misalignment(const void* p, int elem_size) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16u) / elem_size;
}

// The widest vector (elements; a power of two <= max_vec<T>()) whose groups of consecutive
// elements tile rows of `row` elements and start aligned in every one of ptrs (nullptr: none):
// row % V == 0 and each pointer aligned to V * sizeof(T). channels_last rows (row = C) use it, so
// C = 6 floats gets 8-byte vectors rather than scalars.
template <typename T>
int widest_vec(int64_t row, std::initializer_list<const void*> ptrs) {
  int v = max_vec<T>();
  while (v > 1) {
    bool ok = row % v == 0;
    for (const void* p : ptrs)
      ok = ok && (p == nullptr || aligned_to(p, v * static_cast<int>(sizeof(T))));
    if (ok) break;
    v /= 2;
  }
  return v;
}

// The common misalignment (misalignment()) of ptrs (nullptr: none), or -1 when they differ. With
// a common misalignment m, a flat pass peels the (max_vec - m) % max_vec elements before the first
// 16-byte boundary and runs aligned 16-byte vectors over the rest of every tensor at once.
template <typename T>
int common_misalignment(std::initializer_list<const void*> ptrs) {
  int mis = -1;
  for (const void* p : ptrs) {
    if (p == nullptr) continue;
    const int m = misalignment(p, static_cast<int>(sizeof(T)));
    if (mis >= 0 && m != mis) return -1;
    mis = m;
  }
  return mis < 0 ? 0 : mis;
}

// Correctly rounded reciprocal (cheaper than a division; used once per group of values).
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return __drcp_rn(x); }

// ---------------------------------------------------------------------------------------------
// ChannelPtr: a strided per-channel tensor of float/double/half/bfloat16, or nothing.

struct ChannelPtr {
  enum Kind : int32_t { kNone = 0, kFloat, kDouble, kHalf, kBFloat16 };
  void* data = nullptr;
  int64_t stride = 0;
  int32_t kind = kNone;

  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t c, acc_t absent) const {
    const int64_t i = c * stride;
    switch (kind) {
      case kFloat: return static_cast<acc_t>(static_cast<const float*>(data)[i]);
      case kDouble: return static_cast<acc_t>(static_cast<const double*>(data)[i]);
      case kHalf:
        return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(data)[i]));
      case kBFloat16:
        return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]));
      default: return absent;
    }
  }

  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    const int64_t i = c * stride;
    switch (kind) {
      case kFloat: static_cast<float*>(data)[i] = static_cast<float>(v); break;
      case kDouble: static_cast<double*>(data)[i] = static_cast<double>(v); break;
      case kHalf: static_cast<c10::Half*>(data)[i] = c10::Half(static_cast<float>(v)); break;
      case kBFloat16:
        static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(static_cast<float>(v));
        break;
      default: break;
    }
  }
};

inline ChannelPtr channel_ptr(const at::Tensor& t) {
  ChannelPtr p;
  if (!t.defined()) return p;
  switch (t.scalar_type()) {
    case at::kFloat: p.kind = ChannelPtr::kFloat; break;
    case at::kDouble: p.kind = ChannelPtr::kDouble; break;
    case at::kHalf: p.kind = ChannelPtr::kHalf; break;
    case at::kBFloat16: p.kind = ChannelPtr::kBFloat16; break;
    default:
      TORCH_INTERNAL_ASSERT(false, "fusedbn: unexpected per-channel dtype ", t.scalar_type());
  }
  p.data = t.data_ptr();
  p.stride = t.dim() == 0 ? 0 : t.stride(0);
  return p;
}

inline ChannelPtr channel_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? channel_ptr(*t) : ChannelPtr{};
}

}  // namespace cuda
}  // namespace fusedbn
