// Welford running statistics and Chan's merge, shared by the C++ and the CUDA kernels.
//
// A state (n, mean, m2) summarises n values: their mean and the sum of squared deviations from it.
// Chan's merge of two states is associative, so threads, SIMD lanes, warps, blocks and ranks all
// combine partial states the same way; the variance is m2 / n (biased) or m2 / (n - 1).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDBN_HOST_DEVICE inline
#endif

namespace fusedbn {

template <typename acc_t>
struct WelfordState {
  acc_t mean = acc_t(0);
  acc_t m2 = acc_t(0);
  int64_t n = 0;
};

// Adds one value. The caller may pass a precomputed 1/(n+1) when many states share a count.
template <typename acc_t>
FUSEDBN_HOST_DEVICE void welford_push(WelfordState<acc_t>& s, acc_t x) {
  s.n += 1;
  const acc_t delta = x - s.mean;
  s.mean += delta / static_cast<acc_t>(s.n);
  s.m2 += delta * (x - s.mean);
}

// isfinite for the accumulation types, on the host and on the device.
template <typename acc_t>
FUSEDBN_HOST_DEVICE bool welford_isfinite(acc_t v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Chan's mean update mean_a + delta * nb/n, delta = mean_b - mean_a, for states whose means may be
// +-Inf or NaN. The delta form gives inf - inf = NaN when a finite mean meets an infinite one, where
// the mean of values holding +Inf (and no -Inf, no NaN) is +Inf; when delta is not finite this takes
// the weighted form mean_a * na/n + mean_b * nb/n instead, which gives +-Inf there (NaN for +Inf
// with -Inf, or with a NaN: torch's results) and a finite mean when delta overflowed from two
// finite means. Finite delta: the delta form, unchanged.
template <typename acc_t>
FUSEDBN_HOST_DEVICE acc_t welford_mean_update(acc_t mean_a, acc_t mean_b, acc_t delta,
                                              acc_t na_over_n, acc_t nb_over_n) {
  return welford_isfinite(delta) ? mean_a + delta * nb_over_n
                                 : mean_a * na_over_n + mean_b * nb_over_n;
}

// Chan et al.: merges b into a. Empty states are absorbed exactly (no 0/0). The mean goes through
// welford_mean_update, so that a state whose mean is +-Inf (values holding +-Inf) merged with a
// finite one keeps +-Inf, not NaN; for finite means it is the plain delta form. (Every backend
// merges with it: the CPU's chunks and lanes, CUDA's warps, blocks and passes.)
template <typename acc_t>
FUSEDBN_HOST_DEVICE void welford_merge(WelfordState<acc_t>& a, const WelfordState<acc_t>& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const acc_t nb_over_n = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  const acc_t delta = b.mean - a.mean;
  a.mean = welford_mean_update(a.mean, b.mean, delta,
                               static_cast<acc_t>(a.n) / static_cast<acc_t>(n), nb_over_n);
  a.m2 += b.m2 + delta * delta * static_cast<acc_t>(a.n) * nb_over_n;
  a.n = n;
}

// Biased variance m2 / n (what batch norm normalizes with); 0 for an empty state.
template <typename acc_t>
FUSEDBN_HOST_DEVICE acc_t welford_var(const WelfordState<acc_t>& s) {
  return s.n > 0 ? s.m2 / static_cast<acc_t>(s.n) : acc_t(0);
}

}  // namespace fusedbn
