// CPU backward: per-channel sums of dy and dy * (x - mean) in one pass, then dx in one more.
//
// With x_hat = (x - mean) * invstd and M values per channel:
//   train: dx = w * invstd * (dy - sum_dy / M - x_hat * sum(dy * x_hat) / M)
//             = (dy - sum_dy / M) * a - (x - mean) * (a * invstd^2 * sum(dy * (x - mean)) / M)
//   eval:  dx = dy * w * invstd       (a per-channel affine map, no reduction needed)
//   dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)),   dbias = sum(dy).
// As in the forward, a contiguous input with enough small channels is done one channel per task
// so that the dx pass re-reads x and dy from the core's cache.
#include "channel_reduce.h"
#include "grad_input.h"
#include "kernels.h"

#include <ATen/ops/empty.h>

namespace fusedbn::cpu {
namespace {

template <typename scalar_t>
void backward_impl(const at::Tensor& dyt, const at::Tensor& xt, at::Tensor& dxt, const Geometry& g,
                   const at::Tensor& weight, const at::Tensor& mean_t, const at::Tensor& invstd_t,
                   bool train, bool need_dx, bool need_sums, at::Tensor& dw_t, at::Tensor& db_t,
                   bool need_dw, bool need_db) {
  using red_t = red_type<scalar_t>;  // the sums and the coefficients (float64 for float32)
  const int64_t C = g.C;
  const scalar_t* dy = dyt.const_data_ptr<scalar_t>();
  const scalar_t* x = xt.const_data_ptr<scalar_t>();
  scalar_t* dx = need_dx ? dxt.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<red_t> w(C), mean(C), invstd(C), sum_dy(C, red_t(0)), sum_dyx(C, red_t(0));
  read_channel_values<red_t>(weight, C, red_t(1), w.data());
  read_channel_values<red_t>(mean_t, C, red_t(0), mean.data());
  read_channel_values<red_t>(invstd_t, C, red_t(0), invstd.data());
  const red_t inv_m = g.rows() > 0 ? red_t(1) / static_cast<red_t>(g.rows()) : red_t(0);
  GradConstants<scalar_t> k(C);
  auto constants = [&](int64_t c) {
    // The sums rounded to acc_t (forward_train's dtype of the statistics), so that the
    // synchronized pieces given the same rounded statistics reproduce this op bit for bit on one
    // rank (bn_sync.cpp, tests/test_sync_ops.py); one rounding of a float64 sum costs no more than
    // the rounding of the coefficients it makes.
    sum_dy[c] = static_cast<red_t>(static_cast<acc_type<scalar_t>>(sum_dy[c]));
    sum_dyx[c] = static_cast<red_t>(static_cast<acc_type<scalar_t>>(sum_dyx[c]));
    k.set(c, w[c], invstd[c], mean[c], sum_dy[c], sum_dyx[c], inv_m);
  };

  if (train && need_dx && g.layout == Layout::kContiguous &&
      use_per_channel_path(g)) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        nchw_channel_sums(dy, x, g, c, mean[c], sum_dy[c], sum_dyx[c]);
        constants(c);
        const bool prefetch = is_small_plane<scalar_t>(g.S);
        for (int64_t n = g.N - 1; n >= 0; --n) {  // newest in cache first
          const int64_t off = (n * C + c) * g.S;
          if (prefetch) {
            if (n >= kPrefetchPlanes)
              prefetch_plane<true>(dx + off - kPrefetchPlanes * C * g.S, g.S);
            grad_input_run(dy + off, x + off, dx + off, g.S, k, c, true);
          } else {  // long planes: streamed ahead, and the next (lower) plane's head asked for
            if (n > 0) prefetch_plane<true>(dx + off - C * g.S, run_ahead_values<scalar_t>());
            grad_input_run<scalar_t, true>(dy + off, x + off, dx + off, g.S, k, c, true);
          }
        }
      }
    });
  } else {
    if (need_sums) grad_sums(dy, x, g, mean.data(), sum_dy.data(), sum_dyx.data());
    for (int64_t c = 0; c < C; ++c) constants(c);
    if (need_dx) grad_input_all(dy, x, dx, g, k, train);
  }
  // dweight and dbias in red_t (the product of two float32 values is exact in float64), rounded
  // once into the parameters' dtype.
  const auto red = c10::CppTypeToScalarType<red_t>::value;
  if (need_dw) {
    at::Tensor dw_red = at::empty({C}, dw_t.options().dtype(red));
    red_t* p = dw_red.mutable_data_ptr<red_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = sum_dyx[c] * invstd[c];
    dw_t.copy_(dw_red);
  }
  if (need_db) {
    at::Tensor db_red = at::empty({C}, db_t.options().dtype(red));
    red_t* p = db_red.mutable_data_ptr<red_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = sum_dy[c];
    db_t.copy_(db_red);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask) {
  return backward_into(grad_output, input, weight, mean, invstd, train, output_mask, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask,
    const at::Tensor& grad_input_out) {
  constexpr const char* op = "backward";
  check_backward_args(grad_output, input, weight, mean, invstd, op);

  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  const auto acc = acc_dtype(input.scalar_type());
  const auto param_opts = input.options().dtype(defined(weight) ? weight->scalar_type() : acc);
  at::Tensor dx = !need_dx                   ? at::empty({0}, input.options())
                  : grad_input_out.defined() ? grad_input_out
                                             : empty_output(x);
  at::Tensor dw = at::empty({need_dw ? g.C : 0}, param_opts);
  at::Tensor db = at::empty({need_db ? g.C : 0}, param_opts);
  at::Tensor dyc = match_layout(grad_output, x);
  const at::Tensor w = weight.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_backward", [&] {
    backward_impl<scalar_t>(dyc, x, dx, g, w, mean, invstd, train, need_dx,
                            train || need_dw || need_db, dw, db, need_dw, need_db);
  });
  return {dx, dw, db};
}

}  // namespace fusedbn::cpu
