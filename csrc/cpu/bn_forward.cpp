// CPU training forward (batch statistics + normalize + affine) and inference forward.
//
// Contiguous (N, C, S) input with enough channels: one task per channel computes the channel's
// statistics and immediately normalizes the same values while they are still in the core's L2, so
// x is read from memory once. Otherwise (few channels, or channels larger than a cache) the
// statistics are reduced in parallel chunks and the normalize pass runs over all planes; the
// channels-last layout always takes this route, with the channels in the SIMD lanes.
// y = (x - mean) * (invstd * w) + b: subtracting the mean first keeps float32 outputs exact for
// data with a large mean and a small spread.
#include "apply.h"
#include "channel_reduce.h"
#include "kernels.h"

#include <ATen/ops/empty.h>

#include <cmath>

namespace fusedbn::cpu {
namespace {

template <typename acc_t>
struct NormalizeOp {
  template <typename V>
  V operator()(const V* in, const V* k) const { return (in[0] - k[0]) * k[1] + k[2]; }
};

// y over all channels given per-channel mean, scale and shift arrays.
template <typename scalar_t>
void normalize_all(const scalar_t* x, scalar_t* y, const Geometry& g, const acc_type<scalar_t>* mean,
                   const acc_type<scalar_t>* scale, const acc_type<scalar_t>* shift) {
  using acc_t = acc_type<scalar_t>;
  NormalizeOp<acc_t> op;
  if (g.layout == Layout::kChannelsLast) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.C, 1));
    at::parallel_for(0, g.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        apply_row<1, 3, scalar_t>({x + r * g.C}, y + r * g.C, g.C, {mean, scale, shift}, op, op);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % g.C;
        apply_run<1, 3, scalar_t>({x + p * g.S}, y + p * g.S, g.S, {mean[c], scale[c], shift[c]},
                                  op, op);
      }
    });
  }
}

template <typename scalar_t>
void forward_train_impl(const at::Tensor& xt, at::Tensor& yt, const Geometry& g,
                        const at::Tensor& weight, const at::Tensor& bias, double eps,
                        at::Tensor& mean_t, at::Tensor& invstd_t, at::Tensor& var_t) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = xt.const_data_ptr<scalar_t>();
  scalar_t* y = yt.mutable_data_ptr<scalar_t>();
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* invstd = invstd_t.mutable_data_ptr<acc_t>();
  acc_t* var = var_t.mutable_data_ptr<acc_t>();
  std::vector<acc_t> w(g.C), b(g.C), scale(g.C);
  read_channel_values<acc_t>(weight, g.C, acc_t(1), w.data());
  read_channel_values<acc_t>(bias, g.C, acc_t(0), b.data());
  const acc_t eps_a = static_cast<acc_t>(eps);
  auto finish_channel = [&](int64_t c, const WelfordState<acc_t>& st) {
    mean[c] = st.n > 0 ? st.mean : acc_t(0);
    var[c] = welford_var(st);
    invstd[c] = acc_t(1) / std::sqrt(var[c] + eps_a);
    scale[c] = invstd[c] * w[c];
  };

  if (g.layout == Layout::kContiguous && use_per_channel_path(g, sizeof(scalar_t))) {
    NormalizeOp<acc_t> op;
    at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        finish_channel(c, nchw_channel_state(x, g, c));
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c) * g.S;
          apply_run<1, 3, scalar_t>({x + off}, y + off, g.S, {mean[c], scale[c], b[c]}, op, op);
        }
      }
    });
    return;
  }
  std::vector<WelfordState<acc_t>> st(g.C);
  batch_states(x, g, st.data());
  for (int64_t c = 0; c < g.C; ++c) finish_channel(c, st[c]);
  normalize_all(x, y, g, mean, scale.data(), b.data());
}

template <typename scalar_t>
void forward_eval_impl(const at::Tensor& xt, at::Tensor& yt, const Geometry& g,
                       const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> w(g.C), b(g.C), mean(g.C), scale(g.C);
  read_channel_values<acc_t>(weight, g.C, acc_t(1), w.data());
  read_channel_values<acc_t>(bias, g.C, acc_t(0), b.data());
  read_channel_values<acc_t>(running_mean, g.C, acc_t(0), mean.data());
  read_channel_values<acc_t>(running_var, g.C, acc_t(1), scale.data());
  for (int64_t c = 0; c < g.C; ++c)
    scale[c] = w[c] / std::sqrt(scale[c] + static_cast<acc_t>(eps));
  normalize_all(xt.const_data_ptr<scalar_t>(), yt.mutable_data_ptr<scalar_t>(), g, mean.data(),
                scale.data(), b.data());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "forward_train";
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor y = empty_output(x);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_forward_train", [&] {
    forward_train_impl<scalar_t>(x, y, g, w, b, eps, mean, invstd, var);
  });
  return {y, mean, invstd, var};
}

at::Tensor forward_eval(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps) {
  constexpr const char* op = "forward_eval";
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
  check_channel_tensor(running_mean, "running_mean", input, op);
  check_channel_tensor(running_var, "running_var", input, op);
  TORCH_CHECK(eps >= 0, "fusedbn.", op, ": eps must be non-negative, got ", eps);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor y = empty_output(x);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_forward_eval", [&] {
    forward_eval_impl<scalar_t>(x, y, g, w, b, running_mean, running_var, eps);
  });
  return y;
}

}  // namespace fusedbn::cpu
