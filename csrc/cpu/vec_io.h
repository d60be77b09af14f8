// Vector loads and stores between a tensor's dtype and its accumulation type.
//
// A "unit" is the number of input elements that fill kVecs accumulation vectors: one vector for
// float/double, two float vectors for half/bfloat16 (loaded and converted in one go). The same
// source is compiled per CPU capability (see setup.py), so Vectorized<> is AVX2 in one build and
// portable in the other.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16-math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedbn::cpu {

using at::vec::Vectorized;

template <typename scalar_t, typename Enable = void>
struct VecIO {
  using acc_t = scalar_t;
  using AVec = Vectorized<acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t kUnit = AVec::size();
  static inline void load(const scalar_t* p, AVec* v) { v[0] = AVec::loadu(p); }
  static inline void store(scalar_t* p, const AVec* v) { v[0].store(p); }
  // The first n < kUnit values; the other lanes read as zero.
  static inline void load_partial(const scalar_t* p, int64_t n, AVec* v) { v[0] = AVec::loadu(p, n); }
  static inline void store_partial(scalar_t* p, int64_t n, const AVec* v) { v[0].store(p, n); }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<c10::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using AVec = Vectorized<float>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kUnit = 2 * AVec::size();
  static inline void load(const scalar_t* p, AVec* v) {
    at::vec::load_to_float<scalar_t>(p, v[0], v[1]);
  }
  static inline void store(scalar_t* p, const AVec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
  // (Element loops rather than memcpy: n is small and not a constant, and a library call per
  // partial unit showed up in the profiles of 7x7 planes.)
  static inline void load_partial(const scalar_t* p, int64_t n, AVec* v) {
    alignas(32) float buf[kUnit] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    v[0] = AVec::loadu(buf);
    v[1] = AVec::loadu(buf + AVec::size());
  }
  static inline void store_partial(scalar_t* p, int64_t n, const AVec* v) {
    scalar_t buf[kUnit];
    store(buf, v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }
};

template <typename scalar_t>
using acc_type = typename VecIO<scalar_t>::acc_t;

// The reductions' view of the input (statistics, backward sums): the same units, accumulated as
// exactly as torch's CPU kernels do (at::acc_type<scalar_t, /*is_cuda=*/false>): float32 input in
// float64 -- a unit of 2 * 4 floats widened to two double vectors (as half/bfloat16 widen to two
// float vectors) --, half/bfloat16 in float32, float64 in float64. The elementwise passes keep
// VecIO's compute type, with per-channel coefficients computed in red_type and rounded once.
template <typename scalar_t, typename Enable = void>
struct RedIO : VecIO<scalar_t> {};

template <>
struct RedIO<float> {
  using acc_t = double;
  using AVec = Vectorized<double>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kUnit = 2 * AVec::size();
  static inline void load(const float* p, AVec* v) {
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(AVec::size() == 4, "an AVX2 double vector holds 4 values");
    v[0] = _mm256_cvtps_pd(_mm_loadu_ps(p));
    v[1] = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
#else
    for (int j = 0; j < kVecs; ++j) {
      double b[AVec::size()];
      for (int l = 0; l < AVec::size(); ++l) b[l] = static_cast<double>(p[j * AVec::size() + l]);
      v[j] = AVec::loadu(b);
    }
#endif
  }
  static inline void load_partial(const float* p, int64_t n, AVec* v) {
    alignas(32) float buf[kUnit] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
    load(buf, v);
  }
};

template <typename scalar_t>
using red_type = typename RedIO<scalar_t>::acc_t;

// Where the reductions are wider than the elementwise passes (float32 input), the passes subtract
// the float64 mean in two steps: (x - hi) - lo with hi = float(mean), lo = float(mean - hi). The
// first is exact for x near the mean, so a large mean costs the outputs nothing (one float32 mean
// alone would shift every output of a channel with |mean| / std = 1e6 by up to 0.03).
template <typename scalar_t>
constexpr bool kSplitMean = !std::is_same_v<acc_type<scalar_t>, red_type<scalar_t>>;

template <typename acc_t, typename red_t>
inline void split_mean(red_t mean, acc_t& hi, acc_t& lo) {
  hi = static_cast<acc_t>(mean);
  lo = static_cast<acc_t>(mean - static_cast<red_t>(hi));
}

// ---- prefetching --------------------------------------------------------------------------

// Asks for the cache lines of n values at p (kWrite: they are about to be written; a store that
// misses waits for its line to be read in).
template <bool kWrite = false, typename scalar_t>
inline void prefetch_plane(const scalar_t* p, int64_t n) {
  const char* q = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(q + b, kWrite ? 1 : 0);
  __builtin_prefetch(q + bytes - 1, kWrite ? 1 : 0);
}

// How far ahead the walks over long contiguous runs (NCHW planes of more than a few KB) ask for
// the lines they will read or write, and, as a run starts, for the head of the run after it. The
// hardware prefetchers follow such a run, but not far enough ahead for one core to keep memory
// busy, and they stop at the run's end: a channel's next plane lies C * S values further on.
// Measured (32x64x56x56 float32, cold, 2 threads, A/B in one process): the backward's sums 2.18 ->
// 1.48 ms (256 bytes ahead 1.95, 1 KB 1.59, 4 KB 1.63, 8 KB 1.89), the whole backward 3.94 -> 2.79
// ms with the dx pass asking for its output lines too (512 bytes to 4 KB within 3% of each other);
// the forward (statistics and normalize) 3.08 -> 2.01 ms.
constexpr int64_t kRunAheadBytes = 2048;

template <typename scalar_t>
constexpr int64_t run_ahead_values() {
  return kRunAheadBytes / static_cast<int64_t>(sizeof(scalar_t));
}

// Per-channel parameters and statistics come as float32 or the input's dtype; the kernels read them
// once, as the accumulation type, into a small host array (C values, negligible next to the data).
template <typename acc_t>
void read_channel_values(const at::Tensor& t, int64_t C, acc_t fill, acc_t* out) {
  if (!t.defined()) {
    for (int64_t c = 0; c < C; ++c) out[c] = fill;
    return;
  }
  const at::Tensor tc = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "fusedbn_read", [&] {
    const scalar_t* p = tc.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  });
}

}  // namespace fusedbn::cpu
