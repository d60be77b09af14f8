// CPU running-statistics update:
//   running = (1 - f) * running + f * batch,   batch variance made unbiased by count / (count - 1),
// with f = momentum, or f = 1 / num_batches_tracked (cumulative average) when momentum is None.
// C values only: computed in float64 and rounded once into the buffers' own dtype.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

namespace fusedbn::cpu {

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked) {
  constexpr const char* op = "update_running_stats";
  check_update_running_stats_args(running_mean, running_var, mean, var, count, momentum,
                                  num_batches_tracked);
  const int64_t C = mean.size(0);
  double factor = 0;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    const double batches = num_batches_tracked->item<double>();  // a CPU tensor: no device round trip
    TORCH_CHECK(batches > 0, "fusedbn.", op,
                ": num_batches_tracked must be positive when momentum is None, got ", batches);
    factor = 1.0 / batches;
  }
  if (count == 0) return;  // an empty batch leaves the statistics untouched, as torch does

  const auto opts = mean.options().dtype(at::kDouble);
  at::Tensor new_mean = at::empty({C}, opts), new_var = at::empty({C}, opts);
  const at::Tensor rm = running_mean.to(at::kDouble).contiguous();
  const at::Tensor rv = running_var.to(at::kDouble).contiguous();
  const at::Tensor bm = mean.to(at::kDouble).contiguous();
  const at::Tensor bv = var.to(at::kDouble).contiguous();
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const double* prm = rm.const_data_ptr<double>();
  const double* prv = rv.const_data_ptr<double>();
  const double* pbm = bm.const_data_ptr<double>();
  const double* pbv = bv.const_data_ptr<double>();
  double* pm = new_mean.mutable_data_ptr<double>();
  double* pv = new_var.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    pm[c] = (1.0 - factor) * prm[c] + factor * pbm[c];
    pv[c] = (1.0 - factor) * prv[c] + factor * pbv[c] * unbias;
  }
  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
}

}  // namespace fusedbn::cpu
