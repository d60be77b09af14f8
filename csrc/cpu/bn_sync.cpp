// CPU kernels of the local pieces of synchronized batch norm (schemas in csrc/schema.cpp; the
// exchange between ranks and the merge are in fusedbn/distributed.py):
//   batch_stats     per-channel (mean, biased var) of this rank's batch: the Welford reduction of
//                   forward_train (channel_reduce.h batch_states), without the normalize pass;
//   backward_reduce per-channel (sum dy, sum dy * (x - mean)) around the global mean: the
//                   reduction of backward (channel_reduce.h grad_sums);
//   backward_elemt  dx from the global mean/invstd and the sums of all ranks: the dx pass of
//                   backward (grad_input.h) with M = count, the values per channel over all ranks.
// The per-channel statistics these ops take and return are in the reductions' own type
// (red_type, vec_io.h: float64 for float32 and float64 input, float32 for float16/bfloat16), not
// rounded to forward_train's float32: the cross-rank merge (fusedbn/distributed.py, float64) and
// the sums of every rank keep float64 accuracy for float32 input, as torch's CPU kernels have it.
// Rounded to forward_train's dtype, the results are bit-identical to the corresponding parts of
// forward_train and backward on the same data (same reductions, same chunking, same formulas).
#include "channel_reduce.h"
#include "grad_input.h"
#include "kernels.h"

#include <ATen/ops/empty.h>

namespace fusedbn::cpu {
namespace {

// The dtype of the sync ops' statistics for an input dtype: red_type's.
c10::ScalarType sync_stat_dtype(c10::ScalarType input_dtype) {
  return input_dtype == at::kHalf || input_dtype == at::kBFloat16 ? at::kFloat : at::kDouble;
}

// A per-channel statistic of the sync ops (mean, invstd, sum_dy, sum_dy_xmu): shape (C,), the
// sync statistics' dtype, the input's device.
void check_sync_stat(const at::Tensor& t, const char* name, const at::Tensor& input,
                     const char* op) {
  const int64_t C = input.size(1);
  const c10::ScalarType want = sync_stat_dtype(input.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fusedbn.", op, ": ", name, " must have shape (",
              C, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "fusedbn.", op, ": ", name, " must be ",
                   dtype_name(want), " for ", dtype_name(input.scalar_type()),
                   " input on the CPU (the synchronized ops' statistics are in the CPU's "
                   "accumulation type), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(), "fusedbn.", op, ": ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
}

template <typename scalar_t>
void batch_stats_impl(const at::Tensor& xt, const Geometry& g, at::Tensor& mean_t,
                      at::Tensor& var_t) {
  using red_t = red_type<scalar_t>;
  std::vector<WelfordState<red_t>> st(g.C);
  batch_states(xt.const_data_ptr<scalar_t>(), g, st.data());
  red_t* mean = mean_t.mutable_data_ptr<red_t>();
  red_t* var = var_t.mutable_data_ptr<red_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    mean[c] = st[c].n > 0 ? st[c].mean : red_t(0);
    var[c] = welford_var(st[c]);
  }
}

template <typename scalar_t>
void backward_reduce_impl(const at::Tensor& dyt, const at::Tensor& xt, const Geometry& g,
                          const at::Tensor& mean_t, at::Tensor& sum_dy_t, at::Tensor& sum_dyx_t) {
  using red_t = red_type<scalar_t>;
  std::vector<red_t> mean(g.C);
  read_channel_values<red_t>(mean_t, g.C, red_t(0), mean.data());
  grad_sums(dyt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(), g, mean.data(),
            sum_dy_t.mutable_data_ptr<red_t>(), sum_dyx_t.mutable_data_ptr<red_t>());
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
  const auto stat_opts = input.options().dtype(sync_stat_dtype(input.scalar_type()));
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
  check_sync_stat(mean, "mean", input, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor dy = match_layout(grad_output, x);
  const auto stat_opts = input.options().dtype(sync_stat_dtype(input.scalar_type()));
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
  check_input(input, op);
  check_grad_output(grad_output, input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_sync_stat(mean, "mean", input, op);
  check_sync_stat(invstd, "invstd", input, op);
  check_sync_stat(sum_dy, "sum_dy", input, op);
  check_sync_stat(sum_dy_xmu, "sum_dy_xmu", input, op);
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
