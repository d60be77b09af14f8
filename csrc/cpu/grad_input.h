// The grad_input pass of the CPU backward, shared by fusedbn.backward (bn_backward.cpp) and
// fusedbn.backward_elemt (bn_sync.cpp, where the sums and the count are those of all ranks).
//
// With a = w * invstd and M values per channel (the sums taken over the whole batch):
//   train: dx = (dy - sum_dy / M) * a - (x - mean) * (a * invstd^2 * sum(dy * (x - mean)) / M)
//   eval:  dx = dy * a
#pragma once

#include "apply.h"
#include "channel_reduce.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace fusedbn::cpu {

// Training dx. float32/float64: (dy - mean_dy) * a - (x - mean) * ak, centring first as the
// forward does; float16/bfloat16: two fmas, dy * a + x * (-ak) + c0 with
// c0 = mean * ak - mean_dy * a (the conversions make that pass compute-bound, and the output's
// own rounding dominates its error).
struct TrainGradOp {
  template <typename V>
  V operator()(const V* in, const V* k) const { return (in[0] - k[0]) * k[1] - (in[1] - k[2]) * k[3]; }
};

struct TrainGradFmaOp {
  template <typename V>
  V operator()(const V* in, const V* k) const {
    return at::vec::fmadd(in[0], k[0], at::vec::fmadd(in[1], k[1], k[2]));
  }
};

// dx = dy * k0
struct EvalGradOp {
  template <typename V>
  V operator()(const V* in, const V* k) const { return in[0] * k[0]; }
};

template <typename scalar_t>
constexpr bool kGradByFma = c10::is_reduced_floating_point_v<scalar_t>;

// Per-channel coefficients of the maps above: computed in the reductions' type red_t (float64 for
// float32 input, from the float64 sums) and rounded once into the elementwise pass's type acc_t.
template <typename scalar_t>
struct GradConstants {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  std::vector<acc_t> mean_dy, a, mean, ak, neg_ak, c0;
  explicit GradConstants(int64_t C) : mean_dy(C), a(C), mean(C), ak(C), neg_ak(C), c0(C) {}

  // inv_m = 1 / M (0 when there are no values).
  void set(int64_t c, red_t w, red_t invstd, red_t mean_c, red_t sum_dy, red_t sum_dyx,
           red_t inv_m) {
    const red_t a_c = w * invstd;
    const red_t mean_dy_c = sum_dy * inv_m;
    const red_t ak_c = a_c * invstd * invstd * sum_dyx * inv_m;
    a[c] = static_cast<acc_t>(a_c);
    mean_dy[c] = static_cast<acc_t>(mean_dy_c);
    mean[c] = static_cast<acc_t>(mean_c);  // (the saved mean: already in acc_t)
    ak[c] = static_cast<acc_t>(ak_c);
    neg_ak[c] = static_cast<acc_t>(-ak_c);
    c0[c] = static_cast<acc_t>(mean_c * ak_c - mean_dy_c * a_c);
  }
};

// dx of one contiguous run of channel c (an NCHW plane, or part of one). kAhead: dx's lines asked
// for ahead of the stores (apply_run_ahead), for long planes.
template <typename scalar_t, bool kAhead = false>
inline void grad_input_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                           const GradConstants<scalar_t>& k, int64_t c, bool train) {
  auto run = [&](const auto& in, const auto& kv, const auto& f) {
    constexpr int NIn = std::tuple_size_v<std::decay_t<decltype(in)>>;
    constexpr int NK = std::tuple_size_v<std::decay_t<decltype(kv)>>;
    if constexpr (kAhead) {
      apply_run_ahead<NIn, NK, scalar_t>(in, dx, len, kv, f);
    } else {
      apply_run<NIn, NK, scalar_t>(in, dx, len, kv, f);
    }
  };
  using acc_t = acc_type<scalar_t>;
  using In1 = std::array<const scalar_t*, 1>;
  using In2 = std::array<const scalar_t*, 2>;
  if (!train) {
    run(In1{dy}, std::array<acc_t, 1>{k.a[c]}, EvalGradOp{});
  } else if constexpr (kGradByFma<scalar_t>) {
    run(In2{dy, x}, std::array<acc_t, 3>{k.a[c], k.neg_ak[c], k.c0[c]}, TrainGradFmaOp{});
  } else {
    run(In2{dy, x}, std::array<acc_t, 4>{k.mean_dy[c], k.a[c], k.mean[c], k.ak[c]},
        TrainGradOp{});
  }
}

// dx of one channels-last row of C channels.
template <typename scalar_t>
inline void grad_input_row(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C,
                           const GradConstants<scalar_t>& k, bool train) {
  if (!train) {
    apply_row<1, 1, scalar_t>({dy}, dx, C, {k.a.data()}, EvalGradOp{});
  } else if constexpr (kGradByFma<scalar_t>) {
    apply_row<2, 3, scalar_t>({dy, x}, dx, C, {k.a.data(), k.neg_ak.data(), k.c0.data()},
                              TrainGradFmaOp{});
  } else {
    apply_row<2, 4, scalar_t>({dy, x}, dx, C,
                              {k.mean_dy.data(), k.a.data(), k.mean.data(), k.ak.data()},
                              TrainGradOp{});
  }
}

// dx over the whole canonical tensor (dy and dx share x's layout), in parallel.
template <typename scalar_t>
void grad_input_all(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                    const GradConstants<scalar_t>& k, bool train) {
  const int64_t C = g.C;
  if (g.layout == Layout::kChannelsLast) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    const int64_t ahead = stream_ahead_rows<scalar_t>(C), R = g.rows();
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (r + ahead < R) {  // (see kStreamAheadBytes)
          const int64_t o = (r + ahead) * C;
          prefetch_plane(dy + o, C);
          if (train) prefetch_plane(x + o, C);
          prefetch_plane<true>(dx + o, C);
        }
        grad_input_row(dy + r * C, x + r * C, dx + r * C, C, k, train);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
  at::parallel_for(0, g.N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin, c = begin % C; p < end; ++p, c = c + 1 == C ? 0 : c + 1) {
      const int64_t off = p * g.S;
      grad_input_run(dy + off, x + off, dx + off, g.S, k, c, train);
    }
  });
}

}  // namespace fusedbn::cpu
