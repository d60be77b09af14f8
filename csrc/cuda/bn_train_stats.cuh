// The training forward's per-channel epilogue, shared by forward_train (bn_forward.cu: the
// streaming reduce_pass2 and the persistent forwards) and act_forward_train (bn_act_forward.cu:
// its persistent rows path): from the merged WelfordOp state of channel c, the saved mean,
// invstd = 1 / sqrt(var + eps), var = M2 / M (biased) and the normalize coefficients [4][C]
// (shift, shifted mean, invstd * w, b: the mean split in two, bn_elementwise.cuh).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "bn_reduce.cuh"
#include "bn_utils.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {

// s is the shifted state of WelfordOp (bn_reduce_ops.cuh): the mean is s.mean + shift, saved
// rounded once; the normalize pass gets the pair (shift, s.mean) unrounded.
template <typename T, typename acc_t>
struct TrainStatsEpilogue {
  acc_t* mean;
  acc_t* invstd;
  acc_t* var;
  acc_t* coeffs;  // [4][C]: shift, shifted mean, invstd * w, b
  int64_t C;
  acc_t eps;
  ChannelPtr weight, bias;
  ChannelShift<T> shift;

  __device__ void operator()(int64_t c, const fusedbn::WelfordState<acc_t>& s) const {
    const acc_t v = fusedbn::welford_var(s);
    const acc_t is = acc_t(1) / ::sqrt(v + eps);
    const acc_t hi = shift.template load<acc_t>(c);
    mean[c] = s.mean + hi;
    var[c] = v;
    invstd[c] = is;
    coeffs[c] = hi;
    coeffs[C + c] = s.mean;
    coeffs[2 * C + c] = is * weight.load<acc_t>(c, acc_t(1));
    coeffs[3 * C + c] = bias.load<acc_t>(c, acc_t(0));
  }
};

// The epilogue of the canonical input x (geometry g) writing to mean, invstd, var and coeffs
// (the accumulation type of T).
template <typename T>
TrainStatsEpilogue<T, at::opmath_type<T>> train_stats_epilogue(
    const at::Tensor& x, const Geometry& g, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, at::Tensor& mean, at::Tensor& invstd,
    at::Tensor& var, at::Tensor& coeffs) {
  using acc_t = at::opmath_type<T>;
  return {mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(),
          var.mutable_data_ptr<acc_t>(),
          coeffs.mutable_data_ptr<acc_t>(),
          g.C,
          static_cast<acc_t>(eps),
          channel_ptr(weight),
          channel_ptr(bias),
          channel_shift<T>(x, g)};
}

}  // namespace cuda
}  // namespace fusedbn
