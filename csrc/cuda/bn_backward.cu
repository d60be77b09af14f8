// fusedbn.backward on CUDA.
//
// With xhat = (x - mean) * invstd, a = w * invstd and M = N*S values per channel (the CPU
// backend's formulas, csrc/cpu/bn_backward.cpp):
//   train: dx = (dy - sum_dy/M) * a - (x - mean) * (a * invstd^2 * sum(dy * (x - mean)) / M)
//             = w*invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M);
//   eval:  dx = dy * a;   dweight = invstd * sum(dy * (x - mean)) = sum_dy_xhat, dbias = sum_dy.
// Launches on the current stream, no host synchronization:
//   1. when sums are needed (train and dx asked for, or dweight/dbias asked for):
//      reduce_pass1<GradOp> over (dy, x): split reduction of (sum dy, sum dy*(x - mean)) ->
//      partials [C][P]; reduce_pass2 with BackwardEpilogue: per channel, merges the partials in a
//      fixed order, writes grad_weight/grad_bias (weight's dtype) and the dx coefficients;
//      otherwise (eval, dx only) one per-channel kernel writes the dx coefficients;
//   2. train: channel_grad(dy, x) -> dx; eval: channel_affine(dy) -> dx (x is not read).
// Eval mode with dx and grad_weight or grad_bias asked for needs no sums for dx = dy * a, so pass
// 1 writes it as it reads dy (EvalDxOp: a per-channel kernel places (mean, a) for it first) and
// step 2 is not run: dy and x read once, dx written once (3 tensor passes instead of 4); tensors
// of more than 2^30 elements keep the two steps.
// In training mode with dx asked for, the persistent single-read backward runs instead where its
// slab of dy and x fits on chip in co-resident CTAs (one cooperative launch per slab, dy and x
// read once, the same GradOp, merge tree, epilogue and dx map): bn_persistent_backward.cuh for
// the rows layout (channels_last, (N, C)), bn_persistent_nchw_backward.cuh for the contiguous one
// (NCHW, NCDHW, (N, C, L)); 3 tensor passes instead of 5. The launches above are the fallback
// (too large, or the cooperative launch refused), and the path of every other case (without dx
// the reduction reads dy and x once already; eval's dx reads dy alone).
// grad_output is brought to the strides of the canonical input first (common.h match_layout: a
// copy only when they differ), so that every pass reads dy and x at the same offsets.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"
#include "bn_persistent_backward.cuh"
#include "bn_persistent_nchw_backward.cuh"
#include "bn_reduce.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {
namespace {

enum class DxCoeffs : int { kNone = 0, kTrain };

// The dx coefficients of the merged sums (GradEpilogueBase, bn_reduce_ops.cuh) placed for
// channel_grad (training; eval mode's dx needs no sums).
template <typename acc_t>
struct BackwardEpilogue : GradEpilogueBase<acc_t> {
  const acc_t* mean;
  acc_t* coeffs;  // kTrain: [4][C] (sum_dy/M, a, mean, k3); kNone: nullptr
  int64_t C;
  DxCoeffs mode;

  __device__ void operator()(int64_t c, const GradPartial<acc_t>& s) const {
    const ChannelDx<acc_t> d = this->grads(c, s);
    if (mode == DxCoeffs::kTrain) {
      coeffs[c] = d.k0;
      coeffs[C + c] = d.a;
      coeffs[2 * C + c] = mean[c];
      coeffs[3 * C + c] = d.k3;
    }
  }
};

// Eval mode, dx only: coefficients (0, 0, a = w * invstd, 0) for channel_affine over dy.
template <typename acc_t>
__global__ void eval_dx_coeffs_kernel(ChannelPtr weight, const acc_t* invstd, acc_t* coeffs,
                                      int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  coeffs[c] = acc_t(0);
  coeffs[C + c] = acc_t(0);
  coeffs[2 * C + c] = weight.load<acc_t>(c, acc_t(1)) * invstd[c];
  coeffs[3 * C + c] = acc_t(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask) {
  constexpr const char* op = "backward";
  check_backward_args(grad_output, input, weight, mean, invstd, op);
  const DeviceGuard guard(input.device());

  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const auto grad_param_opts =
      input.options().dtype(defined(weight) ? weight->scalar_type() : acc);
  at::Tensor grad_input = need_dx ? empty_output(x) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({need_dw ? g.C : 0}, grad_param_opts);
  at::Tensor grad_bias = at::empty({need_db ? g.C : 0}, grad_param_opts);
  if (g.numel() == 0) {  // no values: the sums are zero
    if (need_dw) grad_weight.zero_();
    if (need_db) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const bool need_sums = (train && need_dx) || need_dw || need_db;
  if (!need_sums && !need_dx) return {grad_input, grad_weight, grad_bias};

  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  // Eval mode with grad_weight or grad_bias: the reduction writes dx (EvalDxOp, 32-bit indices).
  const bool eval_fused = !train && need_dx && need_sums && fits_int32(g.numel());
  const DxCoeffs mode = train && need_dx ? DxCoeffs::kTrain : DxCoeffs::kNone;
  at::Tensor coeffs;
  if (need_dx && !eval_fused) {
    coeffs = at::empty({(train ? kGradParams : kAffineParams) * g.C}, acc_opts);
  }

  bool persistent = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* coeffs_ptr = coeffs.defined() ? coeffs.mutable_data_ptr<acc_t>() : nullptr;
    if (need_sums) {
      using Op = GradOp<scalar_t>;
      const acc_t* mean_ptr = mean_c.const_data_ptr<acc_t>();
      BackwardEpilogue<acc_t> epi{{invstd_c.const_data_ptr<acc_t>(), channel_ptr(weight),
                                   need_dw ? channel_ptr(grad_weight) : ChannelPtr{},
                                   need_db ? channel_ptr(grad_bias) : ChannelPtr{},
                                   acc_t(1) / static_cast<acc_t>(g.rows())},
                                  mean_ptr,
                                  coeffs_ptr,
                                  g.C,
                                  mode};
      if (mode == DxCoeffs::kTrain) {
        persistent = g.layout == Layout::kChannelsLast
                         ? persistent_rows_backward<scalar_t>(dy, x, grad_input, g.rows(), g.C,
                                                              mean_ptr, epi, coeffs)
                         : persistent_nchw_backward<scalar_t>(dy, x, grad_input, g, mean_ptr,
                                                              epi, coeffs);
        if (persistent) return;
      }
      if (eval_fused) {  // dx from the reduction's read of dy
        const at::Tensor params = eval_dx_params<acc_t>(weight, mean_c, invstd_c);
        ReduceExtras ex;
        ex.out0 = grad_input;
        const Partials parts = reduce_pass1<EvalDxOp<Op>>(
            dy, x, params.const_data_ptr<acc_t>(), g, ex);
        reduce_pass2<Op>(parts, g.C, epi);
        return;
      }
      const Partials parts = reduce_pass1<Op>(dy, x, mean_ptr, g);
      reduce_pass2<Op>(parts, g.C, epi);
    } else {
      const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(g.C, kBlockThreads));
      launch_kernel(eval_dx_coeffs_kernel<acc_t>, blocks, kBlockThreads, 0, current_stream(),
                    channel_ptr(weight), invstd_c.const_data_ptr<acc_t>(), coeffs_ptr, g.C);
    }
  });

  if (need_dx && !persistent && !eval_fused) {
    if (train) {
      channel_grad(dy, x, grad_input, g, coeffs);
    } else {
      channel_affine(dy, grad_input, g, coeffs);
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace fusedbn
