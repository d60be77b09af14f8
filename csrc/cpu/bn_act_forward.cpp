// CPU forward of batch norm + residual add + activation: y = act((x - mean) * invstd * w + b + r).
//
// Training: the batch statistics as in bn_forward.cpp (the same reductions of channel_reduce.h:
// per channel with the normalize pass on data still in the core's cache for contiguous input
// with enough small channels, split reductions otherwise), then ONE elementwise pass that reads
// x (and r), writes y and, when asked, the packed sign mask (1 bit per element, taken from y
// while it is in L1). Eval: the same pass with the running statistics' coefficients.
#include "act_apply.h"
#include "act_common.h"
#include "bn_act.h"
#include "channel_reduce.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace fusedbn::cpu {
namespace {

// y = act((x - k0) * k1 + k2 [+ r])   (inputs: x [, r]); float32: ((x - k0) - k3) * k1 + k2, the
// mean as k0 + k3 (see kSplitMean).
template <typename acc_t, Act A, bool kRes, bool kSplit>
struct ActNormalizeOp {
  acc_t slope;
  template <typename V>
  V operator()(const V* in, const V* k) const {
    V xm = in[0] - k[0];
    if constexpr (kSplit) xm = xm - k[3];
    V z = xm * k[1] + k[2];
    if constexpr (kRes) z = z + in[1];
    return ActFn<A>::f(z, V(slope));
  }
};

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* r;  // nullptr without a residual
  scalar_t* y;
  uint8_t* mask;      // nullptr unless save_mask
  Geometry g;
  Act act;
  acc_t slope;
  std::vector<acc_t> mean, scale, shift;  // per-channel coefficients of the normalize pass
  std::vector<acc_t> mean_lo;             // mean's rounding error (see kSplitMean)
};

template <int NIn, typename T>
std::array<const T*, NIn> inputs(const T* x, const T* r) {
  if constexpr (NIn == 1) {
    return {x};
  } else {
    return {x, r};
  }
}

// The elementwise pass over everything (coefficients ready).
template <typename scalar_t, Act A, bool kRes>
void apply_act_all(ForwardArgs<scalar_t>& a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int NIn = kRes ? 2 : 1;
  const ActNormalizeOp<acc_t, A, kRes, kSplitMean<scalar_t>> op{a.slope};
  const std::array<const acc_t*, 4> k{a.mean.data(), a.scale.data(), a.shift.data(),
                                      a.mean_lo.data()};
  const bool relu = A == Act::kRelu;
  if (a.mask != nullptr) {
    apply_all<NIn, 4, scalar_t>(inputs<NIn>(a.x, a.r), a.y, a.g, k, op,
                                [&](int64_t e0, int64_t e1) { pack_mask(a.y, a.mask, e0, e1, relu); });
  } else {
    apply_all<NIn, 4, scalar_t>(inputs<NIn>(a.x, a.r), a.y, a.g, k, op, NoEpilogue{});
  }
}

// Contiguous input, one task per channel: stats(c) fills the channel's coefficients, then its
// planes are normalized while they are still in cache.
template <typename scalar_t, Act A, bool kRes, typename Stats>
void apply_act_per_channel(ForwardArgs<scalar_t>& a, const Stats& stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr int NIn = kRes ? 2 : 1;
  const ActNormalizeOp<acc_t, A, kRes, kSplitMean<scalar_t>> op{a.slope};
  const Geometry& g = a.g;
  const bool relu = A == Act::kRelu;
  auto down8 = [](int64_t e) { return e & ~int64_t{7}; };
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      stats(c);
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t off = (n * g.C + c) * g.S;
        apply_run<NIn, 4, scalar_t>(inputs<NIn>(a.x + off, a.r == nullptr ? nullptr : a.r + off),
                                    a.y + off, g.S,
                                    {a.mean[c], a.scale[c], a.shift[c], a.mean_lo[c]}, op);
        // The mask bytes that lie wholly inside this plane (the plane's values are in L1).
        const int64_t b0 = down8(off + 7), b1 = down8(off + g.S);
        if (a.mask != nullptr && b0 < b1) pack_mask(a.y, a.mask, b0, b1, relu);
      }
    }
  });
  if (a.mask == nullptr) return;
  // The bytes shared by two planes (S % 8 != 0) and a partial last byte, once all planes exist.
  const int64_t planes = g.N * g.C, numel = g.numel();
  at::parallel_for(0, planes + 1, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t e = std::min(p * g.S, numel);
      const bool first_in_byte = p == 0 || (p - 1) * g.S <= down8(e);  // (S < 8: one writer)
      if (e % 8 != 0 && first_in_byte)
        pack_mask(a.y, a.mask, down8(e), std::min(down8(e) + 8, numel), relu);
    }
  });
}

template <typename scalar_t>
void act_forward_train_impl(ForwardArgs<scalar_t>& a, const at::Tensor& weight,
                            const at::Tensor& bias, double eps, at::Tensor& mean_t,
                            at::Tensor& invstd_t, at::Tensor& var_t) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;  // statistics and coefficients (float64 for float32)
  const Geometry& g = a.g;
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* invstd = invstd_t.mutable_data_ptr<acc_t>();
  acc_t* var = var_t.mutable_data_ptr<acc_t>();
  std::vector<red_t> w(g.C);
  a.mean.resize(g.C);
  a.mean_lo.resize(g.C);
  a.scale.resize(g.C);
  a.shift.resize(g.C);
  read_channel_values<red_t>(weight, g.C, red_t(1), w.data());
  read_channel_values<acc_t>(bias, g.C, acc_t(0), a.shift.data());
  const red_t eps_r = static_cast<red_t>(eps);
  auto finish_channel = [&](int64_t c, const WelfordState<red_t>& st) {
    const red_t m = st.n > 0 ? st.mean : red_t(0);
    const red_t v = welford_var(st);
    const red_t is = red_t(1) / std::sqrt(v + eps_r);
    split_mean(m, a.mean[c], a.mean_lo[c]);
    mean[c] = a.mean[c];
    var[c] = static_cast<acc_t>(v);
    invstd[c] = static_cast<acc_t>(is);
    a.scale[c] = static_cast<acc_t>(is * w[c]);
  };
  const bool per_channel =
      g.layout == Layout::kContiguous && use_per_channel_path(g);
  if (!per_channel) {
    std::vector<WelfordState<red_t>> st(g.C);
    if (g.layout == Layout::kChannelsLast) {
      cl_stats(a.x, g, st.data());
    } else {
      nchw_stats_split(a.x, g, st.data());
    }
    for (int64_t c = 0; c < g.C; ++c) finish_channel(c, st[c]);
  }
  dispatch_act(a.act, [&](auto act_tag) {
    constexpr Act A = decltype(act_tag)::value;
    auto run = [&](auto res_tag) {
      constexpr bool kRes = decltype(res_tag)::value;
      if (per_channel) {
        apply_act_per_channel<scalar_t, A, kRes>(
            a, [&](int64_t c) { finish_channel(c, nchw_channel_state(a.x, g, c)); });
      } else {
        apply_act_all<scalar_t, A, kRes>(a);
      }
    };
    if (a.r != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

template <typename scalar_t>
void act_forward_eval_impl(ForwardArgs<scalar_t>& a, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  const int64_t C = a.g.C;
  std::vector<red_t> w(C), var(C);
  a.mean.resize(C);
  a.mean_lo.assign(C, acc_t(0));  // the running mean is a value of its buffer's dtype
  a.scale.resize(C);
  a.shift.resize(C);
  read_channel_values<red_t>(weight, C, red_t(1), w.data());
  read_channel_values<acc_t>(bias, C, acc_t(0), a.shift.data());
  read_channel_values<acc_t>(running_mean, C, acc_t(0), a.mean.data());
  read_channel_values<red_t>(running_var, C, red_t(1), var.data());
  for (int64_t c = 0; c < C; ++c)
    a.scale[c] = static_cast<acc_t>(w[c] / std::sqrt(var[c] + static_cast<red_t>(eps)));
  dispatch_act(a.act, [&](auto act_tag) {
    constexpr Act A = decltype(act_tag)::value;
    if (a.r != nullptr) {
      apply_act_all<scalar_t, A, true>(a);
    } else {
      apply_act_all<scalar_t, A, false>(a);
    }
  });
}

template <typename scalar_t>
ForwardArgs<scalar_t> make_args(const at::Tensor& x, const at::Tensor& r, at::Tensor& y,
                                at::Tensor& mask, const Geometry& g, Act act, double slope) {
  ForwardArgs<scalar_t> a;
  a.x = x.const_data_ptr<scalar_t>();
  a.r = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
  a.y = y.mutable_data_ptr<scalar_t>();
  a.mask = mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
  a.g = g;
  a.act = act;
  a.slope = static_cast<acc_type<scalar_t>>(slope);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    double eps, int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_train";
  const Act act =
      check_act_forward_args(input, weight, bias, residual, activation, negative_slope, save_mask, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_act_forward_train", [&] {
    auto a = make_args<scalar_t>(x, r, y, mask, g, act, negative_slope);
    act_forward_train_impl<scalar_t>(a, w, b, eps, mean, invstd, var);
  });
  return {y, mean, invstd, var, mask};
}

std::tuple<at::Tensor, at::Tensor> act_forward_eval(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual, double eps,
    int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_eval";
  const Act act =
      check_act_forward_args(input, weight, bias, residual, activation, negative_slope, save_mask, op);
  check_eval_stats_args(running_mean, running_var, input, eps, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_act_forward_eval", [&] {
    auto a = make_args<scalar_t>(x, r, y, mask, g, act, negative_slope);
    act_forward_eval_impl<scalar_t>(a, w, b, running_mean, running_var, eps);
  });
  return {y, mask};
}

}  // namespace fusedbn::cpu
