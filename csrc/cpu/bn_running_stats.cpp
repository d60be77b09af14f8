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
  TORCH_CHECK(mean.dim() == 1, "fusedbn.", op, ": mean must be 1-D (C,), got ", mean.sizes());
  const int64_t C = mean.size(0);
  TORCH_CHECK_TYPE(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
                   "fusedbn.", op, ": mean must be float32 or float64, got ",
                   dtype_name(mean.scalar_type()));
  TORCH_CHECK(var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type(), "fusedbn.",
              op, ": var must match mean (", mean.sizes(), ", ", dtype_name(mean.scalar_type()),
              "), got ", var.sizes(), ", ", dtype_name(var.scalar_type()));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fusedbn.", op, ": ", name, " must have shape (",
                C, ",), got ", t.sizes());
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), "fusedbn.", op, ": ", name,
                     " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
    TORCH_CHECK(t.device() == mean.device(), "fusedbn.", op, ": ", name,
                " must be on the statistics' device ", mean.device(), ", got ", t.device());
  }
  TORCH_CHECK(count >= 0 && count != 1, "fusedbn.", op,
              ": count must be 0 (nothing to update) or at least 2 (the unbiased variance of one "
              "value is undefined), got ", count);
  double factor = 0;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    TORCH_CHECK(num_batches_tracked.has_value() && num_batches_tracked->defined(), "fusedbn.", op,
                ": num_batches_tracked must be given when momentum is None (cumulative average)");
    const at::Tensor& nbt = *num_batches_tracked;
    TORCH_CHECK(nbt.numel() == 1 && nbt.device() == mean.device(), "fusedbn.", op,
                ": num_batches_tracked must be a one-element tensor on ", mean.device(), ", got ",
                nbt.sizes(), " on ", nbt.device());
    const double batches = nbt.item<double>();  // a CPU tensor: no device round trip
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
