// fusedbn.update_running_stats on CUDA: one thread per channel,
//   running_mean = (1 - f) * running_mean + f * mean
//   running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
// computed in float64 and rounded once into the buffers' own dtype, as the CPU backend does
// (csrc/cpu/bn_running_stats.cpp, whose checks and wording this file follows). f = momentum, or,
// when momentum is None, f = 1 / num_batches_tracked read by the kernel itself: no .item(), no
// host synchronization, so a training step stays capturable in a CUDA graph. A count below 1
// (0, negative, NaN), which the kernel cannot refuse without a synchronization, counts as 1 on
// every backend (common.h, cumulative_average_factor): the running statistics become the batch's. count == 0 (an empty
// batch) leaves the statistics untouched, as torch does; count is a host value, so deciding that
// needs no synchronization either. Running statistics of any floating dtype and stride are read
// and written in place through ChannelPtr.
#include <ATen/core/Tensor.h>

#include <utility>

#include "bn_cuda_ops.h"
#include "bn_utils.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {
namespace {

// num_batches_tracked: int64 (read as is) or another dtype (converted to float64 first).
__global__ void update_running_stats_kernel(ChannelPtr running_mean, ChannelPtr running_var,
                                            ChannelPtr mean, ChannelPtr var, int64_t C,
                                            double unbias, double momentum,
                                            const int64_t* batches_i64,
                                            const double* batches_f64) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double f = batches_i64 != nullptr   ? cumulative_average_factor(
                                                  static_cast<double>(*batches_i64))
                   : batches_f64 != nullptr ? cumulative_average_factor(*batches_f64)
                                            : momentum;
  const double rm = running_mean.load<double>(c, 0.0);
  const double rv = running_var.load<double>(c, 0.0);
  running_mean.store<double>(c, (1.0 - f) * rm + f * mean.load<double>(c, 0.0));
  running_var.store<double>(c, (1.0 - f) * rv + f * var.load<double>(c, 0.0) * unbias);
}

}  // namespace

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked) {
  check_update_running_stats_args(running_mean, running_var, mean, var, count, momentum,
                                  num_batches_tracked);
  const int64_t C = mean.size(0);
  if (count == 0 || C == 0) return;  // an empty batch leaves the statistics untouched
  const DeviceGuard guard(mean.device());
  at::Tensor batches;  // keeps a converted num_batches_tracked alive until the launch
  const int64_t* batches_i64 = nullptr;
  const double* batches_f64 = nullptr;
  if (!momentum.has_value()) {
    if (num_batches_tracked->scalar_type() == at::kLong) {
      batches_i64 = num_batches_tracked->const_data_ptr<int64_t>();
    } else {
      batches = num_batches_tracked->to(at::kDouble);  // on the device: no synchronization
      batches_f64 = batches.const_data_ptr<double>();
    }
  }
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(C, kBlockThreads));
  launch_kernel(update_running_stats_kernel, blocks, kBlockThreads, 0, current_stream(),
                channel_ptr(running_mean), channel_ptr(running_var), channel_ptr(mean),
                channel_ptr(var), C, unbias, momentum.value_or(0.0), batches_i64, batches_f64);
}

}  // namespace cuda
}  // namespace fusedbn
