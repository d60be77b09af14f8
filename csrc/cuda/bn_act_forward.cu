// fusedbn.act_forward_train and fusedbn.act_forward_eval on CUDA:
//   y = act((x - mean) * invstd * w + b + r), and the packed sign mask when asked.
//
// Training: the batch statistics and the normalize coefficients [4][C] exactly as forward_train
// computes them (train_stats in bn_forward.cu: split Welford reduction + per-channel epilogue),
// then ONE elementwise pass (bn_act_ew.cuh) that reads x and r and writes y and the mask: the
// residual add and the activation cost no extra pass over memory. Eval: eval_coeffs, then the
// same pass. No host synchronization; the checks and wording are the CPU backend's
// (act_common.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "act_common.h"
#include "bn_act_cuda.h"
#include "bn_act_ew.cuh"
#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"

namespace fusedbn {
namespace cuda {
namespace {

// in: x, r; out: y; params (hi, lo, scale, shift) of channel_affine (bn_elementwise.cuh: the
// mean split as hi + lo); bit: the sign of the (rounded) output.
struct ApplyFn {
  static constexpr int kIn = 2, kOut = 1, kParams = kAffineParams;
  static constexpr bool kUsesAct = true;
  template <Act A, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool& bit,
                                               const ActEwArgs<T>& a) {
    acc_t z = ((in[0] - p[0]) - p[1]) * p[2] + p[3];
    if (a.in[1] != nullptr) z += in[1];
    out[0] = ActFn<A>::f(z, a.slope);
    bit = positive_output(static_cast<acc_t>(static_cast<T>(out[0])), a.relu_bits);
  }
};

void apply_act(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, at::Tensor& mask,
               const Geometry& g, const at::Tensor& coeffs, Act act, double slope) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_act_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ActEwArgs<scalar_t> a;
    a.in[0] = x.const_data_ptr<scalar_t>();
    a.in[1] = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    a.out[0] = y.mutable_data_ptr<scalar_t>();
    a.mask_out = mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    a.params = coeffs.const_data_ptr<acc_t>();
    a.slope = static_cast<acc_t>(slope);
    a.act = static_cast<int>(act);
    a.relu_bits = act == Act::kRelu;
    launch_act_ew<ApplyFn, scalar_t>(a, g, x.get_device());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    double eps, int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_train";
  const Act act = check_act_forward_args(input, weight, bias, residual, activation,
                                         negative_slope, save_mask, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto stat_opts = input.options().dtype(acc);
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  if (g.C == 0) return {y, mean, invstd, var, mask};
  if (g.numel() == 0) {  // empty batch: no statistics to take
    mean.zero_();
    var.zero_();
    invstd.fill_(empty_invstd(eps, acc));
    return {y, mean, invstd, var, mask};
  }
  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  train_stats(x, g, weight, bias, eps, mean, invstd, var, coeffs);
  apply_act(x, r, y, mask, g, coeffs, act, negative_slope);
  return {y, mean, invstd, var, mask};
}

std::tuple<at::Tensor, at::Tensor> act_forward_eval(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual, double eps,
    int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_eval";
  const Act act = check_act_forward_args(input, weight, bias, residual, activation,
                                         negative_slope, save_mask, op);
  check_eval_stats_args(running_mean, running_var, input, eps, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  if (g.numel() == 0) return {y, mask};
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  eval_coeffs(g, running_mean, running_var, weight, bias, eps, coeffs);
  apply_act(x, r, y, mask, g, coeffs, act, negative_slope);
  return {y, mask};
}

}  // namespace cuda
}  // namespace fusedbn
