// The grad_input pass of the CPU backward, shared by fusedbn.backward (bn_backward.cpp) and
// fusedbn.backward_elemt (bn_sync.cpp, where the sums and the count are those of all ranks).
//
// With a = w * invstd and M values per channel (the sums taken over the whole batch):
//   train: dx = (dy - sum_dy / M) * a - (x - mean) * (a * invstd^2 * sum(dy * (x - mean)) / M)
//   eval:  dx = dy * a
#pragma once

#include "apply.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fusedbn::cpu {

// dx = (dy - k0) * k1 - (x - k2) * k3   (inputs: dy, x)
struct TrainGradOp {
  template <typename V>
  V operator()(const V* in, const V* k) const { return (in[0] - k[0]) * k[1] - (in[1] - k[2]) * k[3]; }
};

// dx = dy * k0
struct EvalGradOp {
  template <typename V>
  V operator()(const V* in, const V* k) const { return in[0] * k[0]; }
};

// Per-channel coefficients of the two maps above: (mean_dy, a, mean, ak) for train, a for eval.
template <typename scalar_t>
struct GradConstants {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> mean_dy, a, mean, ak;
  explicit GradConstants(int64_t C) : mean_dy(C), a(C), mean(C), ak(C) {}

  // inv_m = 1 / M (0 when there are no values).
  void set(int64_t c, acc_t w, acc_t invstd, acc_t mean_c, acc_t sum_dy, acc_t sum_dyx,
           acc_t inv_m) {
    a[c] = w * invstd;
    mean_dy[c] = sum_dy * inv_m;
    mean[c] = mean_c;
    ak[c] = a[c] * invstd * invstd * sum_dyx * inv_m;
  }
};

// dx of one contiguous run of channel c (an NCHW plane, or part of one).
template <typename scalar_t>
inline void grad_input_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                           const GradConstants<scalar_t>& k, int64_t c, bool train) {
  if (train) {
    TrainGradOp op;
    apply_run<2, 4, scalar_t>({dy, x}, dx, len, {k.mean_dy[c], k.a[c], k.mean[c], k.ak[c]}, op, op);
  } else {
    EvalGradOp op;
    apply_run<1, 1, scalar_t>({dy}, dx, len, {k.a[c]}, op, op);
  }
}

// dx over the whole canonical tensor (dy and dx share x's layout), in parallel.
template <typename scalar_t>
void grad_input_all(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                    const GradConstants<scalar_t>& k, bool train) {
  const int64_t C = g.C;
  if (g.layout == Layout::kChannelsLast) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, g.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * C;
        if (train) {
          TrainGradOp op;
          apply_row<2, 4, scalar_t>({dy + off, x + off}, dx + off, C,
                                    {k.mean_dy.data(), k.a.data(), k.mean.data(), k.ak.data()},
                                    op, op);
        } else {
          EvalGradOp op;
          apply_row<1, 1, scalar_t>({dy + off}, dx + off, C, {k.a.data()}, op, op);
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
  at::parallel_for(0, g.N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t off = p * g.S;
      grad_input_run(dy + off, x + off, dx + off, g.S, k, p % C, train);
    }
  });
}

}  // namespace fusedbn::cpu
