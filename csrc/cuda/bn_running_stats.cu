// fusedbn.update_running_stats on CUDA: one thread per channel,
//   running_mean = (1 - f) * running_mean + f * mean
//   running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
// computed in the batch statistics' dtype (the accumulation type), with f = momentum, or, when
// momentum is None, f = 1 / num_batches_tracked read by the kernel itself: no .item(), no host
// synchronization, so a training step stays capturable in a CUDA graph. count == 0 (an empty
// batch) leaves the statistics untouched, as torch does; count is a host value, so that decision
// needs no synchronization either. Running statistics of any supported dtype and stride are read
// and written in place through ChannelPtr.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bn_cuda_ops.h"
#include "bn_utils.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {
namespace {

constexpr const char* kOp = "fusedbn.update_running_stats: ";

template <typename acc_t>
__global__ void update_running_stats_kernel(ChannelPtr running_mean, ChannelPtr running_var,
                                            ChannelPtr mean, ChannelPtr var, int64_t C,
                                            int64_t count, acc_t momentum,
                                            const int64_t* num_batches_tracked) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t f = num_batches_tracked != nullptr
                      ? acc_t(1) / static_cast<acc_t>(*num_batches_tracked)
                      : momentum;
  const acc_t m = mean.load<acc_t>(c, acc_t(0));
  const acc_t unbiased =
      var.load<acc_t>(c, acc_t(0)) * static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
  const acc_t rm = running_mean.load<acc_t>(c, acc_t(0));
  const acc_t rv = running_var.load<acc_t>(c, acc_t(0));
  running_mean.store<acc_t>(c, (acc_t(1) - f) * rm + f * m);
  running_var.store<acc_t>(c, (acc_t(1) - f) * rv + f * unbiased);
}

void check_per_channel(const at::Tensor& t, const char* name, const at::Tensor& running_mean) {
  const int64_t C = running_mean.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, kOp, name, " must have shape (", C,
              ",) to match running_mean, got ", t.sizes());
  TORCH_CHECK(t.device() == running_mean.device(), kOp, name, " must be on running_mean's device ",
              running_mean.device(), ", got ", t.device());
}

void check_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                const at::Tensor& mean, const at::Tensor& var, int64_t count,
                c10::optional<double> momentum,
                const c10::optional<at::Tensor>& num_batches_tracked) {
  TORCH_CHECK(running_mean.dim() == 1, kOp, "running_mean must have shape (C,), got ",
              running_mean.sizes());
  check_per_channel(running_var, "running_var", running_mean);
  check_per_channel(mean, "mean", running_mean);
  check_per_channel(var, "var", running_mean);

  const at::ScalarType stat = mean.scalar_type();
  TORCH_CHECK_TYPE(stat == at::kFloat || stat == at::kDouble, kOp,
                   "mean must be float32 or float64 (the batch statistics' dtype), got ", stat);
  TORCH_CHECK_TYPE(var.scalar_type() == stat, kOp, "var must have mean's dtype ", stat, ", got ",
                   var.scalar_type());
  // Running statistics: float32, or the dtype of an input whose batch statistics have this dtype.
  const at::ScalarType rs = running_mean.scalar_type();
  const bool rs_ok = stat == at::kDouble
                         ? (rs == at::kDouble || rs == at::kFloat)
                         : (rs == at::kFloat || rs == at::kHalf || rs == at::kBFloat16);
  TORCH_CHECK_TYPE(rs_ok, kOp, "running_mean must be ",
                   stat == at::kDouble ? "float64 or float32" : "float32, float16 or bfloat16",
                   " for ", stat, " batch statistics, got ", rs);
  TORCH_CHECK_TYPE(running_var.scalar_type() == rs, kOp,
                   "running_var must have running_mean's dtype ", rs, ", got ",
                   running_var.scalar_type());
  TORCH_CHECK(count >= 0, kOp, "count must be non-negative, got ", count);
  if (momentum.has_value()) return;
  TORCH_CHECK(defined(num_batches_tracked), kOp,
              "num_batches_tracked must be a tensor when momentum is None, got None");
  const at::Tensor& nbt = *num_batches_tracked;
  TORCH_CHECK_TYPE(nbt.scalar_type() == at::kLong, kOp, "num_batches_tracked must be int64, got ",
                   nbt.scalar_type());
  TORCH_CHECK(nbt.numel() == 1, kOp, "num_batches_tracked must have one element, got shape ",
              nbt.sizes());
  TORCH_CHECK(nbt.device() == running_mean.device(), kOp,
              "num_batches_tracked must be on running_mean's device ", running_mean.device(),
              ", got ", nbt.device());
}

}  // namespace

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked) {
  check_args(running_mean, running_var, mean, var, count, momentum, num_batches_tracked);
  const int64_t C = running_mean.size(0);
  if (count == 0 || C == 0) return;  // an empty batch leaves the statistics untouched
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t* nbt =
      momentum.has_value() ? nullptr : num_batches_tracked->const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fusedbn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(C, kBlockThreads));
    update_running_stats_kernel<acc_t><<<blocks, kBlockThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        channel_ptr(running_mean), channel_ptr(running_var), channel_ptr(mean), channel_ptr(var),
        C, count, static_cast<acc_t>(momentum.value_or(0.0)), nbt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace fusedbn
