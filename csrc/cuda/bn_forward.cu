// fusedbn.forward_train and fusedbn.forward_eval on CUDA.
//
// forward_train, three launches on the current stream, no host synchronization:
//   1. reduce_pass1<WelfordOp>: split Welford reduction (bn_reduce.cuh) -> partial states [C][P];
//   2. reduce_pass2 with TrainStatsEpilogue: per channel, merges the P partials in a fixed order,
//      writes mean, invstd = 1/sqrt(var + eps), var = M2/M (biased), and the affine coefficients
//      (shift, shifted mean, invstd * w, b) for the normalize pass;
//   3. channel_affine (bn_elementwise.cu): y = ((x - shift) - shifted mean) * (invstd * w) + b,
//      vectorized: the mean split in two (bn_elementwise.cuh), so that x - mean keeps the digits
//      a mean rounded at its own magnitude loses when |mean| >> std.
// Where the tensor (or a slab of its channels per launch) fits on chip in co-resident CTAs, the
// persistent single-read forward runs instead (one cooperative launch per slab, x read once, the
// same WelfordOp, merge tree and epilogue): bn_persistent.cuh for the rows layout (channels_last,
// (N, C)), bn_persistent_nchw.cuh for the contiguous one (NCHW, NCDHW, (N, C, L)); the three
// launches above are the fallback (too large, or the cooperative launch refused).
//
// forward_eval: one per-channel kernel computes (rm, 0, w / sqrt(rv + eps), b), then
// channel_affine.
// The per-channel formulas and the checks follow the CPU backend (csrc/cpu/bn_forward.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <tuple>

#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"
#include "bn_persistent.cuh"
#include "bn_persistent_nchw.cuh"
#include "bn_reduce.cuh"
#include "bn_train_stats.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {
namespace {

template <typename acc_t>
__global__ void eval_coeffs_kernel(ChannelPtr running_mean, ChannelPtr running_var,
                                   ChannelPtr weight, ChannelPtr bias, acc_t eps, acc_t* coeffs,
                                   int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  coeffs[c] = running_mean.load<acc_t>(c, acc_t(0));
  coeffs[C + c] = acc_t(0);
  const acc_t rv = running_var.load<acc_t>(c, acc_t(1));
  coeffs[2 * C + c] = weight.load<acc_t>(c, acc_t(1)) / ::sqrt(rv + eps);
  coeffs[3 * C + c] = bias.load<acc_t>(c, acc_t(0));
}

void check_affine(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const char* op) {
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
}

}  // namespace

double empty_invstd(double eps, at::ScalarType acc) {
  if (acc == at::kDouble) return 1.0 / std::sqrt(eps);
  return static_cast<double>(1.0f / std::sqrt(static_cast<float>(eps)));
}

void train_stats(const at::Tensor& x, const Geometry& g, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, double eps, at::Tensor& mean,
                 at::Tensor& invstd, at::Tensor& var, at::Tensor& coeffs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_forward_train", [&] {
    using Op = WelfordOp<scalar_t>;
    const Partials parts = reduce_pass1<Op>(x, at::Tensor(), nullptr, g);
    reduce_pass2<Op>(parts, g.C,
                     train_stats_epilogue<scalar_t>(x, g, weight, bias, eps, mean, invstd, var,
                                                    coeffs));
  });
}

// The persistent forward (bn_persistent.cuh for the rows layout, bn_persistent_nchw.cuh for the
// contiguous one), or false (nothing written) where it does not fit: the caller takes the
// streaming path.
bool persistent_train(const at::Tensor& x, const at::Tensor& out, const Geometry& g,
                      const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps, at::Tensor& mean,
                      at::Tensor& invstd, at::Tensor& var, at::Tensor& coeffs) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_forward_train_persistent", [&] {
    const auto epi =
        train_stats_epilogue<scalar_t>(x, g, weight, bias, eps, mean, invstd, var, coeffs);
    done = g.layout == Layout::kChannelsLast
               ? persistent_rows_forward<scalar_t>(
                     x, g.rows(), g.C, epi, coeffs,
                     AffineStore<scalar_t>{out.mutable_data_ptr<scalar_t>()})
               : persistent_nchw_forward<scalar_t>(x, out, g, epi, coeffs);
  });
  return done;
}

void eval_coeffs(const Geometry& g, const at::Tensor& running_mean, const at::Tensor& running_var,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 double eps, at::Tensor& coeffs) {
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "fusedbn_forward_eval", [&] {
    using acc_t = scalar_t;
    const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(g.C, kBlockThreads));
    launch_kernel(eval_coeffs_kernel<acc_t>, blocks, kBlockThreads, 0, current_stream(),
                  channel_ptr(running_mean), channel_ptr(running_var), channel_ptr(weight),
                  channel_ptr(bias), static_cast<acc_t>(eps), coeffs.mutable_data_ptr<acc_t>(),
                  g.C);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "forward_train";
  check_affine(input, weight, bias, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor out = empty_output(x);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto stat_opts = input.options().dtype(acc);
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  if (g.C == 0) return {out, mean, invstd, var};
  if (g.numel() == 0) {  // empty batch: no statistics to take
    mean.zero_();
    var.zero_();
    invstd.fill_(empty_invstd(eps, acc));
    return {out, mean, invstd, var};
  }

  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  if (persistent_train(x, out, g, weight, bias, eps, mean, invstd, var, coeffs))
    return {out, mean, invstd, var};
  train_stats(x, g, weight, bias, eps, mean, invstd, var, coeffs);
  channel_affine(x, out, g, coeffs);
  return {out, mean, invstd, var};
}

at::Tensor forward_eval(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps) {
  constexpr const char* op = "forward_eval";
  check_affine(input, weight, bias, op);
  check_eval_stats_args(running_mean, running_var, input, eps, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor out = empty_output(x);
  if (g.numel() == 0) return out;

  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  eval_coeffs(g, running_mean, running_var, weight, bias, eps, coeffs);
  channel_affine(x, out, g, coeffs);
  return out;
}

}  // namespace cuda
}  // namespace fusedbn
