// The local pieces of synchronized batch norm on CUDA (schemas in csrc/schema.cpp; the exchange
// between ranks and the merge are in fusedbn/distributed.py). They reuse the split reduction of
// bn_reduce.cuh and the element-wise passes of bn_elementwise.cuh, with their own epilogues:
//   batch_stats:     reduce_pass1<WelfordOp>(x) + reduce_pass2 writing (mean, M2 / n): the
//                    statistics half of forward_train (bn_forward.cu);
//   backward_reduce: reduce_pass1<GradOp>(dy, x; mean) + reduce_pass2 writing
//                    (sum dy, sum dy * (x - mean)): the reduction half of backward (bn_backward.cu);
//   backward_elemt:  one per-channel kernel computes the dx coefficients of backward's train mode
//                    from the global sums and count (k0 = sum_dy / M, k1 = a = w * invstd,
//                    k2 = mean, k3 = a * invstd^2 * sum_dy_xmu / M), then channel_grad.
// All launches go to the current stream; nothing synchronizes with the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"
#include "bn_reduce.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {
namespace {

// s is the shifted state of WelfordOp (bn_reduce_ops.cuh): the mean is s.mean + shift.
template <typename T, typename acc_t>
struct StatsEpilogue {
  acc_t* mean;
  acc_t* var;
  ChannelShift<T> shift;
  __device__ void operator()(int64_t c, const fusedbn::WelfordState<acc_t>& s) const {
    mean[c] = s.n > 0 ? s.mean + shift.template load<acc_t>(c) : acc_t(0);
    var[c] = fusedbn::welford_var(s);
  }
};

template <typename acc_t>
struct SumsEpilogue {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  __device__ void operator()(int64_t c, const GradPartial<acc_t>& s) const {
    sum_dy[c] = s.sum_dy.value();
    sum_dy_xmu[c] = s.sum_dy_xmu.value();
  }
};

// The coefficients [4][C] of channel_grad (bn_elementwise.cuh) from the global sums.
template <typename acc_t>
__global__ void elemt_coeffs_kernel(ChannelPtr weight, const acc_t* mean, const acc_t* invstd,
                                    const acc_t* sum_dy, const acc_t* sum_dy_xmu, acc_t inv_m,
                                    acc_t* coeffs, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t is = invstd[c];
  const acc_t a = weight.load<acc_t>(c, acc_t(1)) * is;
  coeffs[c] = sum_dy[c] * inv_m;
  coeffs[C + c] = a;
  coeffs[2 * C + c] = mean[c];
  coeffs[3 * C + c] = a * is * is * sum_dy_xmu[c] * inv_m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input) {
  constexpr const char* op = "batch_stats";
  check_input(input, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  if (g.C == 0) return {mean, var};
  if (g.numel() == 0) {  // an empty batch: count 0, nothing to contribute
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Op = WelfordOp<scalar_t>;
    const Partials parts = reduce_pass1<Op>(x, at::Tensor(), nullptr, g);
    reduce_pass2<Op>(parts, g.C,
                     StatsEpilogue<scalar_t, acc_t>{mean.mutable_data_ptr<acc_t>(),
                                                    var.mutable_data_ptr<acc_t>(),
                                                    channel_shift<scalar_t>(x, g)});
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                   const at::Tensor& input,
                                                   const at::Tensor& mean) {
  constexpr const char* op = "backward_reduce";
  check_input(input, op);
  check_grad_output(grad_output, input, op);
  check_stat_tensor(mean, "mean", input, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor sum_dy = at::empty({g.C}, stat_opts);
  at::Tensor sum_dy_xmu = at::empty({g.C}, stat_opts);
  if (g.C == 0) return {sum_dy, sum_dy_xmu};
  if (g.numel() == 0) {  // no values: the sums are zero
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor mean_c = mean.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Op = GradOp<scalar_t>;
    const Partials parts = reduce_pass1<Op>(dy, x, mean_c.const_data_ptr<acc_t>(), g);
    reduce_pass2<Op>(parts, g.C,
                     SumsEpilogue<acc_t>{sum_dy.mutable_data_ptr<acc_t>(),
                                         sum_dy_xmu.mutable_data_ptr<acc_t>()});
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "backward_elemt";
  check_backward_elemt_args(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  check_sync_count(count, g, op);
  at::Tensor grad_input = empty_output(x);
  if (g.numel() == 0) return grad_input;

  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor sum_dy_c = sum_dy.contiguous(), sum_dy_xmu_c = sum_dy_xmu.contiguous();
  at::Tensor coeffs =
      at::empty({kGradParams * g.C}, input.options().dtype(acc_dtype(input.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "fusedbn_backward_elemt", [&] {
    using acc_t = scalar_t;
    const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(g.C, kBlockThreads));
    launch_kernel(elemt_coeffs_kernel<acc_t>, blocks, kBlockThreads, 0, current_stream(),
                  channel_ptr(weight), mean_c.const_data_ptr<acc_t>(),
                  invstd_c.const_data_ptr<acc_t>(), sum_dy_c.const_data_ptr<acc_t>(),
                  sum_dy_xmu_c.const_data_ptr<acc_t>(), acc_t(1) / static_cast<acc_t>(count),
                  coeffs.mutable_data_ptr<acc_t>(), g.C);
  });
  channel_grad(dy, x, grad_input, g, coeffs);
  return grad_input;
}

}  // namespace cuda
}  // namespace fusedbn
