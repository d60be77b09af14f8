// CPU kernels of the local pieces of synchronized batch norm (schemas in csrc/schema.cpp; the
// exchange between ranks and the merge are in fusedbn/distributed.py):
//   batch_stats     per-channel (mean, biased var) of this rank's batch: the Welford reduction of
//                   forward_train (channel_reduce.h batch_states), without the normalize pass;
//   backward_reduce per-channel (sum dy, sum dy * (x - mean)) around the global mean: the
//                   reduction of backward (channel_reduce.h grad_sums);
//   backward_elemt  dx from the global mean/invstd and the sums of all ranks: the dx pass of
//                   backward (grad_input.h) with M = count, the values per channel over all ranks.
// The results are bit-identical to the corresponding parts of forward_train and backward on the
// same data (same reductions, same chunking, same formulas), so one rank reproduces them exactly.
#include "channel_reduce.h"
#include "grad_input.h"
#include "kernels.h"

#include <ATen/ops/empty.h>

namespace fusedbn::cpu {
namespace {

template <typename scalar_t>
void batch_stats_impl(const at::Tensor& xt, const Geometry& g, at::Tensor& mean_t,
                      at::Tensor& var_t) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  std::vector<WelfordState<red_t>> st(g.C);
  batch_states(xt.const_data_ptr<scalar_t>(), g, st.data());
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* var = var_t.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    mean[c] = static_cast<acc_t>(st[c].n > 0 ? st[c].mean : red_t(0));
    var[c] = static_cast<acc_t>(welford_var(st[c]));
  }
}

template <typename scalar_t>
void backward_reduce_impl(const at::Tensor& dyt, const at::Tensor& xt, const Geometry& g,
                          const at::Tensor& mean_t, at::Tensor& sum_dy_t, at::Tensor& sum_dyx_t) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  std::vector<red_t> mean(g.C), sum_dy(g.C), sum_dyx(g.C);
  read_channel_values<red_t>(mean_t, g.C, red_t(0), mean.data());
  grad_sums(dyt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(), g, mean.data(),
            sum_dy.data(), sum_dyx.data());
  acc_t* out_dy = sum_dy_t.mutable_data_ptr<acc_t>();
  acc_t* out_dyx = sum_dyx_t.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    out_dy[c] = static_cast<acc_t>(sum_dy[c]);
    out_dyx[c] = static_cast<acc_t>(sum_dyx[c]);
  }
}

template <typename scalar_t>
void backward_elemt_impl(const at::Tensor& dyt, const at::Tensor& xt, at::Tensor& dxt,
                         const Geometry& g, const at::Tensor& weight, const at::Tensor& mean_t,
                         const at::Tensor& invstd_t, const at::Tensor& sum_dy_t,
                         const at::Tensor& sum_dyx_t, int64_t count) {
  using red_t = red_type<scalar_t>;
  const int64_t C = g.C;
  std::vector<red_t> w(C), mean(C), invstd(C), sum_dy(C), sum_dyx(C);
  read_channel_values<red_t>(weight, C, red_t(1), w.data());
  read_channel_values<red_t>(mean_t, C, red_t(0), mean.data());
  read_channel_values<red_t>(invstd_t, C, red_t(0), invstd.data());
  read_channel_values<red_t>(sum_dy_t, C, red_t(0), sum_dy.data());
  read_channel_values<red_t>(sum_dyx_t, C, red_t(0), sum_dyx.data());
  const red_t inv_m = count > 0 ? red_t(1) / static_cast<red_t>(count) : red_t(0);
  GradConstants<scalar_t> k(C);
  for (int64_t c = 0; c < C; ++c)
    k.set(c, w[c], invstd[c], mean[c], sum_dy[c], sum_dyx[c], inv_m);
  grad_input_all(dyt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(),
                 dxt.mutable_data_ptr<scalar_t>(), g, k, /*train=*/true);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input) {
  constexpr const char* op = "batch_stats";
  check_input(input, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_batch_stats", [&] {
    batch_stats_impl<scalar_t>(x, g, mean, var);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                   const at::Tensor& input, const at::Tensor& mean) {
  constexpr const char* op = "backward_reduce";
  check_input(input, op);
  check_grad_output(grad_output, input, op);
  check_stat_tensor(mean, "mean", input, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor dy = match_layout(grad_output, x);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor sum_dy = at::empty({g.C}, stat_opts);
  at::Tensor sum_dy_xmu = at::empty({g.C}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_backward_reduce", [&] {
    backward_reduce_impl<scalar_t>(dy, x, g, mean, sum_dy, sum_dy_xmu);
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "backward_elemt";
  check_backward_elemt_args(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  check_sync_count(count, g, op);
  const at::Tensor dy = match_layout(grad_output, x);
  at::Tensor dx = empty_output(x);
  const at::Tensor w = weight.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_backward_elemt", [&] {
    backward_elemt_impl<scalar_t>(dy, x, dx, g, w, mean, invstd, sum_dy, sum_dy_xmu, count);
  });
  return dx;
}

}  // namespace fusedbn::cpu
