// CPU running-statistics update:
//   running = (1 - f) * running + f * batch,   batch variance made unbiased by count / (count - 1),
// with f = momentum, or f = 1 / max(num_batches_tracked, 1) (cumulative average) when momentum is
// None.
// C values only: computed in float64 and rounded once into the buffers' own dtype.
#include "kernels.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>

#include <vector>

namespace fusedbn::cpu {
namespace {

// True for a one-element CPU tensor of a real dtype: read and advanced in place below.
bool is_host_counter(const at::Tensor& t) {
  return t.is_cpu() && t.layout() == at::kStrided && t.numel() == 1 &&
         (at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false));
}

// The value of num_batches_tracked (a CPU tensor: checked by the caller), read in place rather
// than by item(), a dispatch on every step.
double counter_value(const at::Tensor& t) {
  if (!is_host_counter(t)) return t.item<double>();
  double v = 0;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fusedbn_counter", [&] {
    v = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return v;
}

}  // namespace

void advance_counter(const at::Tensor& counter) {
  if (!is_host_counter(counter)) {
    counter.add_(1);
    return;
  }
  // First, so that an inference tensor outside InferenceMode is refused (as by add_) before its
  // value changes.
  counter.unsafeGetTensorImpl()->bump_version();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, counter.scalar_type(), "fusedbn_counter",
                             [&] {
    scalar_t* p = counter.mutable_data_ptr<scalar_t>();
    *p = static_cast<scalar_t>(*p + scalar_t(1));
  });
}

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked) {
  check_update_running_stats_args(running_mean, running_var, mean, var, count, momentum,
                                  num_batches_tracked);
  const int64_t C = mean.size(0);
  double factor = 0;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    // A CPU tensor: no device round trip. Below 1 (0 or negative from a hand-edited state_dict,
    // NaN) counts as 1, the first batch: the running statistics become the batch's, as on CUDA
    // (csrc/cuda/bn_running_stats.cu), where the kernel cannot raise without a synchronization.
    factor = cumulative_average_factor(counter_value(*num_batches_tracked));
  }
  if (count == 0) return;  // an empty batch leaves the statistics untouched, as torch does

  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  std::vector<double> bm(C), bv(C);
  read_channel_values<double>(mean, C, 0.0, bm.data());
  read_channel_values<double>(var, C, 0.0, bv.data());
  // In place, through the buffers' own strides and dtype: no temporaries (this runs every step,
  // and on small layers a handful of tensor ops here cost as much as the kernel).
  auto blend = [&](const at::Tensor& running, const std::vector<double>& batch, double scale) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(),
                                    "fusedbn_update_running_stats", [&] {
      scalar_t* p = running.mutable_data_ptr<scalar_t>();
      const int64_t stride = running.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        scalar_t& r = p[c * stride];
        r = static_cast<scalar_t>((1.0 - factor) * static_cast<double>(r) +
                                  factor * batch[c] * scale);
      }
    });
  };
  blend(running_mean, bm, 1.0);
  blend(running_var, bv, unbias);
}

}  // namespace fusedbn::cpu
