// CPU backward of y = act(z), z = x_hat * w + b + r, x_hat = (x - mean) * invstd.
//
// With dz = dy * act'(z) (the gradient at the activation's input), the rest is batch norm's own
// backward with dz in place of dy:
//   grad_residual = dz,   grad_bias = sum dz,   grad_weight = sum dz * x_hat,
//   train: grad_input = w * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))
//   eval:  grad_input = w * invstd * dz
// so this file computes dz (and, in memory-saving mode, x_hat) in one elementwise pass and hands
// them to fusedbn::cpu::backward (bn_backward.cpp), which reduces and writes grad_input.
//
// Where dz comes from (`source`):
//  * input: z is recomputed from x (and r) with the forward's coefficients; any activation.
//  * mask: relu / leaky_relu read the sign of z from the forward's packed mask (1 bit per value):
//    dz = bit ? dy : slope * dy; x is read by the batch-norm backward only.
//  * output (memory-saving): identity / leaky_relu with slope > 0 are invertible:
//    z = y > 0 ? y : y / slope, x_hat = (z - b - r) / w. Note that the training grad_input needs
//    x_hat at EVERY value, also where dz = 0 (the term x_hat * mean(dz * x_hat)); that is why relu
//    (y = 0 says nothing about z < 0) cannot be recovered from its output and keeps x + a mask.
//    x_hat / invstd is handed to the batch-norm backward as its "x" with a zero mean, so that
//    neither the mean nor a rounding of x_hat + mean enters.
#include "act_apply.h"
#include "act_common.h"
#include "bn_act.h"
#include "kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace fusedbn::cpu {
namespace {

// dz = act.grad(z, dy), z = (x - k0) * k1 + k2 [+ r]   (inputs: dy, x [, r])
template <typename acc_t, Act A, bool kRes>
struct GradFromInputOp {
  acc_t slope;
  template <typename V>
  V operator()(const V* in, const V* k) const {
    V z = (in[1] - k[0]) * k[1] + k[2];
    if constexpr (kRes) z = z + in[2];
    return ActFn<A>::grad(z, in[0], V(slope));
  }
};

// dz = dy * leaky_relu'(y)   (inputs: dy, y); the sign of y is the sign of z.
template <typename acc_t>
struct GradFromOutputOp {
  acc_t slope;
  template <typename V>
  V operator()(const V* in, const V*) const {
    return ActFn<Act::kLeakyRelu>::grad(in[1], in[0], V(slope));
  }
};

// x_hat / invstd = (z - k0 [- r]) * k1 with z = inverse(y), k0 = b, k1 = 1 / (w * invstd)
template <typename acc_t, bool kRes>
struct RecoverOp {
  acc_t inv_slope;
  template <typename V>
  V operator()(const V* in, const V* k) const {
    V z = inverse_leaky(in[0], V(inv_slope)) - k[0];
    if constexpr (kRes) z = z - in[1];
    return z * k[1];
  }
};

template <typename scalar_t>
struct Prep {
  using acc_t = acc_type<scalar_t>;
  Geometry g;
  const scalar_t* dy;
  const scalar_t* saved;
  const scalar_t* r;  // nullptr without a residual
  scalar_t* dz;
  Act act;
  acc_t slope;
  std::vector<acc_t> k0, k1, k2;
};

template <int N, typename T>
std::array<const T*, N> first(const T* a, const T* b, const T* c) {
  if constexpr (N == 2) {
    return {a, b};
  } else {
    return {a, b, c};
  }
}

template <typename scalar_t>
void grad_from_input(Prep<scalar_t>& p) {
  using acc_t = acc_type<scalar_t>;
  const std::array<const acc_t*, 3> k{p.k0.data(), p.k1.data(), p.k2.data()};
  dispatch_act(p.act, [&](auto act_tag) {
    constexpr Act A = decltype(act_tag)::value;
    if (p.r != nullptr) {
      apply_all<3, 3, scalar_t>(first<3>(p.dy, p.saved, p.r), p.dz, p.g, k,
                                GradFromInputOp<acc_t, A, true>{p.slope}, NoEpilogue{});
    } else {
      apply_all<2, 3, scalar_t>(first<2>(p.dy, p.saved, p.r), p.dz, p.g, k,
                                GradFromInputOp<acc_t, A, false>{p.slope}, NoEpilogue{});
    }
  });
}

template <typename scalar_t>
void recover(Prep<scalar_t>& p, scalar_t* xc) {
  using acc_t = acc_type<scalar_t>;
  const std::array<const acc_t*, 2> k{p.k0.data(), p.k1.data()};
  const acc_t inv_slope = p.act == Act::kIdentity ? acc_t(1) : acc_t(1) / p.slope;
  if (p.r != nullptr) {
    apply_all<2, 2, scalar_t>({p.saved, p.r}, xc, p.g, k, RecoverOp<acc_t, true>{inv_slope},
                              NoEpilogue{});
  } else {
    apply_all<1, 2, scalar_t>({p.saved}, xc, p.g, k, RecoverOp<acc_t, false>{inv_slope},
                              NoEpilogue{});
  }
}

void check_weight_invertible(const at::Tensor& weight, const char* op) {
  if (!weight.defined()) return;
  const at::Tensor w = weight.to(at::kDouble).contiguous();
  const double* p = w.const_data_ptr<double>();
  for (int64_t c = 0; c < w.numel(); ++c) {
    TORCH_CHECK(p[c] != 0, "fusedbn.", op, ": source 2 (output) divides by weight, but weight[",
                c, "] is 0; x_hat cannot be recovered from the output of such a channel (save "
                "the input instead: source 0 or 1)");
  }
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
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  if (src == ActSource::kOutput) check_weight_invertible(w, op);

  Geometry g;
  const at::Tensor x = canonicalize(saved, g);
  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  const bool need_bn = output_mask[0] || output_mask[1] || output_mask[2];
  const auto acc = acc_dtype(saved.scalar_type());

  at::Tensor dz, xc;
  if (act == Act::kIdentity) {
    dz = output_mask[3] ? dy.clone() : dy;  // (a result never aliases an argument)
  } else {
    dz = empty_output(x);
  }
  if (src == ActSource::kOutput && need_bn) xc = empty_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_act_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    Prep<scalar_t> p;
    p.g = g;
    p.dy = dy.const_data_ptr<scalar_t>();
    p.saved = x.const_data_ptr<scalar_t>();
    p.r = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    p.dz = act == Act::kIdentity ? nullptr : dz.mutable_data_ptr<scalar_t>();
    p.act = act;
    p.slope = static_cast<acc_t>(negative_slope);
    const int64_t C = g.C;
    using red_t = red_type<scalar_t>;  // the coefficients (float64 for float32), rounded once
    std::vector<red_t> wv(C), is(C);
    read_channel_values<red_t>(w, C, red_t(1), wv.data());
    read_channel_values<red_t>(invstd, C, red_t(0), is.data());
    p.k0.resize(C);
    p.k1.resize(C);
    p.k2.resize(C);
    if (src == ActSource::kInput && act != Act::kIdentity) {  // k = (mean, invstd * w, b)
      read_channel_values<acc_t>(mean, C, acc_t(0), p.k0.data());
      for (int64_t c = 0; c < C; ++c) p.k1[c] = static_cast<acc_t>(is[c] * wv[c]);
      read_channel_values<acc_t>(b, C, acc_t(0), p.k2.data());
      grad_from_input(p);
    } else if (src == ActSource::kMask) {
      grad_from_mask(p.dy, mask->const_data_ptr<uint8_t>(), p.dz, g.numel(), act == Act::kRelu,
                     p.slope);
    } else if (src == ActSource::kOutput) {
      if (act != Act::kIdentity) {
        apply_all<2, 0, scalar_t>({p.dy, p.saved}, p.dz, g, {}, GradFromOutputOp<acc_t>{p.slope},
                                  NoEpilogue{});
      }
      if (need_bn) {  // k = (b, 1 / (w * invstd))
        read_channel_values<acc_t>(b, C, acc_t(0), p.k0.data());
        for (int64_t c = 0; c < C; ++c) p.k1[c] = static_cast<acc_t>(red_t(1) / (wv[c] * is[c]));
        recover(p, xc.mutable_data_ptr<scalar_t>());
      }
    }
  });

  at::Tensor dx, dw, db;
  if (need_bn) {
    const bool from_output = src == ActSource::kOutput;
    // dx goes into dz's own buffer when dz is a temporary (one large allocation less).
    const bool reuse = !output_mask[3] && act != Act::kIdentity;
    std::tie(dx, dw, db) = backward_into(
        dz, from_output ? xc : x, weight, from_output ? at::zeros({g.C}, mean.options()) : mean,
        invstd, train, {output_mask[0], output_mask[1], output_mask[2]},
        reuse ? dz : at::Tensor());
  } else {
    const auto param_opts = saved.options().dtype(w.defined() ? w.scalar_type() : acc);
    dx = at::empty({0}, saved.options());
    dw = at::empty({0}, param_opts);
    db = at::empty({0}, param_opts);
  }
  at::Tensor dr = output_mask[3] ? dz : at::empty({0}, saved.options());
  return {dx, dw, db, dr};
}

}  // namespace fusedbn::cpu
