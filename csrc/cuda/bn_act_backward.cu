// fusedbn.act_backward on CUDA. The math is the CPU backend's (csrc/cpu/bn_act_backward.cpp):
// dz = dy * act'(z) is the gradient at the activation's input (and grad_residual); the rest is
// batch norm's backward with dz in place of dy, so after one elementwise pass (bn_act_ew.cuh)
// that writes dz -- and, in memory-saving mode, x_hat / invstd recovered from the output -- this
// calls fusedbn::cuda::backward (bn_backward.cu: split reduction + dx pass). Sources of dz:
//   input:  z = (x - mean) * invstd * w + b + r recomputed, dz = act.grad(z, dy);
//   mask:   dz = bit ? dy : slope * dy   (relu: a select, no multiply);
//   output: z = y > 0 ? y : y / slope, x_hat / invstd = (z - b - r) / (w * invstd),
//           dz = y > 0 ? dy : slope * dy   (identity: slope 1, dz = dy is not rewritten).
// The zero-weight precondition of the output source is the caller's (fusedbn/act_ops.py checks
// it before choosing that source); checking it here would need a host synchronization.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "act_common.h"
#include "bn_act_cuda.h"
#include "bn_act_ew.cuh"
#include "bn_cuda_ops.h"

namespace fusedbn {
namespace cuda {
namespace {

// in: dy, x, r; out: dz; params (mean, invstd * w, b).
struct GradFromInputFn {
  static constexpr int kIn = 3, kOut = 1, kParams = 3;
  static constexpr bool kUsesAct = true;
  template <Act A, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    acc_t z = (in[1] - p[0]) * p[1] + p[2];
    if (a.in[2] != nullptr) z += in[2];
    out[0] = ActFn<A>::grad(z, in[0], a.slope);
  }
};

// in: dy; mask in; out: dz.
struct GradFromMaskFn {
  static constexpr int kIn = 1, kOut = 1, kParams = 0;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t*, bool bit,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    out[0] = bit ? in[0] : (a.relu_bits ? acc_t(0) : in[0] * a.slope);
  }
};

// in: dy, y, r; out: dz, x_hat / invstd; params (b, 1 / (w * invstd)).
struct RecoverFn {
  static constexpr int kIn = 3, kOut = 2, kParams = 2;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    out[0] = ActFn<Act::kLeakyRelu>::grad(in[1], in[0], a.slope);
    acc_t z = inverse_leaky(in[1], a.inv_slope) - p[0];
    if (a.in[2] != nullptr) z -= in[2];
    out[1] = z * p[1];
  }
};

template <class Fn, typename T>
void launch(const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& in2,
            const at::Tensor& out0, const at::Tensor& out1, const at::Tensor& mask,
            const at::Tensor& params, const Geometry& g, Act act, double slope) {
  using acc_t = at::opmath_type<T>;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  auto mut = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; };
  ActEwArgs<T> a;
  a.in[0] = ptr(in0);
  a.in[1] = ptr(in1);
  a.in[2] = ptr(in2);
  a.out[0] = mut(out0);
  a.out[1] = mut(out1);
  a.mask_in = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  a.params = params.defined() ? params.const_data_ptr<acc_t>() : nullptr;
  a.slope = static_cast<acc_t>(act == Act::kIdentity ? 1.0 : slope);
  a.inv_slope = static_cast<acc_t>(act == Act::kIdentity ? 1.0 : 1.0 / slope);
  a.act = static_cast<int>(act);
  a.relu_bits = act == Act::kRelu;
  launch_act_ew<Fn, T>(a, g, in0.get_device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, int64_t activation,
    double negative_slope, int64_t source, std::array<bool, 4> output_mask) {
  constexpr const char* op = "act_backward";
  Act act;
  ActSource src;
  std::tie(act, src) = check_act_backward_args(grad_output, saved, residual, mask, weight, bias,
                                               mean, invstd, activation, negative_slope, source, op);
  const DeviceGuard guard(saved.device());
  Geometry g;
  const at::Tensor x = canonicalize(saved, g);
  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  const bool need_bn = output_mask[0] || output_mask[1] || output_mask[2];
  const auto acc_opts = saved.options().dtype(acc_dtype(saved.scalar_type()));
  const at::Tensor w = defined(weight) ? weight->to(acc_opts) : at::ones({g.C}, acc_opts);
  const at::Tensor b = defined(bias) ? bias->to(acc_opts) : at::zeros({g.C}, acc_opts);

  at::Tensor dz = act == Act::kIdentity ? (output_mask[3] ? dy.clone() : dy) : empty_output(x);
  at::Tensor xc;
  if (src == ActSource::kOutput && need_bn) xc = empty_output(x);
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "fusedbn_act_backward", [&] {
      if (src == ActSource::kInput && act != Act::kIdentity) {
        const at::Tensor params = at::cat({mean, invstd * w, b});
        launch<GradFromInputFn, scalar_t>(dy, x, r, dz, at::Tensor(), at::Tensor(), params, g,
                                          act, negative_slope);
      } else if (src == ActSource::kMask) {
        launch<GradFromMaskFn, scalar_t>(dy, at::Tensor(), at::Tensor(), dz, at::Tensor(), *mask,
                                         at::Tensor(), g, act, negative_slope);
      } else if (src == ActSource::kOutput && (need_bn || act != Act::kIdentity)) {
        const at::Tensor params = at::cat({b, (w * invstd).reciprocal()});
        launch<RecoverFn, scalar_t>(dy, x, r, act == Act::kIdentity ? at::Tensor() : dz, xc,
                                    at::Tensor(), params, g, act, negative_slope);
      }
    });
  }

  at::Tensor dx, dw, db;
  if (need_bn) {
    const bool from_output = src == ActSource::kOutput;
    std::tie(dx, dw, db) =
        backward(dz, from_output ? xc : x, weight, from_output ? at::zeros_like(mean) : mean,
                 invstd, train, {output_mask[0], output_mask[1], output_mask[2]});
  } else {
    const auto param_opts = defined(weight) ? saved.options().dtype(weight->scalar_type()) : acc_opts;
    dx = at::empty({0}, saved.options());
    dw = at::empty({0}, param_opts);
    db = at::empty({0}, param_opts);
  }
  at::Tensor dr = output_mask[3] ? dz : at::empty({0}, saved.options());
  return {dx, dw, db, dr};
}

}  // namespace cuda
}  // namespace fusedbn
