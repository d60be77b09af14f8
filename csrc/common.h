// Host-side glue shared by the CPU and CUDA launchers: argument checks (one wording for every
// backend) and the canonical view of an (N, C, *) input that the kernels work on.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

namespace fusedbn {

// The two memory layouts the kernels know. Anything else is copied into kContiguous first.
enum class Layout {
  kContiguous,    // (N, C, S) with S = prod(spatial): planes of S values per (n, c)
  kChannelsLast,  // (N*S, C): rows of C values, channel fastest
};

struct Geometry {
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 1;  // spatial size, 1 for (N, C)
  Layout layout = Layout::kContiguous;
  int64_t rows() const { return N * S; }        // values per channel
  int64_t numel() const { return N * C * S; }
};

// torch's Python spelling of a dtype ("float32", "bfloat16", "int64"), for error messages.
inline const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation type: float64 for float64 input, float32 for everything else.
inline c10::ScalarType acc_dtype(c10::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), "fusedbn.", op, ": input must be a tensor, got None");
  TORCH_CHECK(input.dim() >= 2, "fusedbn.", op,
              ": input must have at least 2 dimensions (N, C, *), got ", input.dim(), "D input");
  TORCH_CHECK_TYPE(is_float_dtype(input.scalar_type()), "fusedbn.", op,
                   ": input must be float32, float64, float16 or bfloat16, got ",
                   dtype_name(input.scalar_type()));
}

// True when the strides are those of a dense channels-last tensor of any rank: C fastest, then the
// spatial dimensions in order, then N. Sizes of 1 may carry any stride.
inline bool is_channels_last_dense(const at::Tensor& t) {
  const int64_t d = t.dim();
  if (d < 3) return false;
  int64_t expected = 1;
  auto ok = [&](int64_t dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
    return true;
  };
  if (!ok(1)) return false;
  for (int64_t k = d - 1; k >= 2; --k)
    if (!ok(k)) return false;
  return ok(0);
}

// Picks the layout the kernels will read. Returns the tensor to read (the input itself, or a
// contiguous copy when the input is neither contiguous nor dense channels-last).
inline at::Tensor canonicalize(const at::Tensor& input, Geometry& g) {
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t k = 2; k < input.dim(); ++k) g.S *= input.size(k);
  if (g.S == 1 && input.is_contiguous()) {
    g.layout = Layout::kChannelsLast;  // (N, C): rows of C values
    return input;
  }
  if (input.is_contiguous()) {
    g.layout = Layout::kContiguous;
    return input;
  }
  if (is_channels_last_dense(input)) {
    g.layout = Layout::kChannelsLast;
    return input;
  }
  g.layout = Layout::kContiguous;
  return input.contiguous();
}

// The dtypes a per-channel tensor may have for an input of dtype `input`, for error messages:
// "float16 (the input's dtype) or float32", or "float32 (the input's dtype)" for float32 input.
inline std::string channel_dtypes_allowed(c10::ScalarType input) {
  std::string s = std::string(dtype_name(input)) + " (the input's dtype)";
  if (input != at::kFloat) s += " or float32";
  return s;
}

// A per-channel tensor argument (weight, bias, running statistics): shape (C,), floating dtype
// equal to the input's or float32, same device as the input.
inline void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                                 const char* op) {
  const int64_t C = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fusedbn.", op, ": ", name,
              " must have shape (", C, ",) to match the ", C, " channels of input (dim 1), got ",
              t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat,
                   "fusedbn.", op, ": ", name, " must be ",
                   channel_dtypes_allowed(input.scalar_type()), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(), "fusedbn.", op, ": ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
}

inline void check_optional_channel_tensor(const c10::optional<at::Tensor>& t, const char* name,
                                          const at::Tensor& input, const char* op) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, name, input, op);
}

// weight and bias share one dtype when both are given (the kernels read them as one type).
inline void check_weight_bias_dtypes(const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, const char* op) {
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == bias->scalar_type(), "fusedbn.", op,
                     ": weight and bias must have the same dtype, got ",
                     dtype_name(weight->scalar_type()), " and ", dtype_name(bias->scalar_type()));
  }
}

// Saved per-channel statistics (mean, invstd, var): shape (C,), the accumulation dtype.
inline void check_stat_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                              const char* op) {
  const int64_t C = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fusedbn.", op, ": ", name, " must have shape (",
              C, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc_dtype(input.scalar_type()), "fusedbn.", op, ": ", name,
                   " must be ", dtype_name(acc_dtype(input.scalar_type())), " for ",
                   dtype_name(input.scalar_type()), " input, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(), "fusedbn.", op, ": ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
}

// grad_output of a backward op: the input's shape, dtype and device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                              const char* op) {
  TORCH_CHECK(grad_output.defined() && grad_output.sizes() == input.sizes(), "fusedbn.", op,
              ": grad_output must have the input's shape ", input.sizes(), ", got ",
              grad_output.defined() ? grad_output.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "fusedbn.", op,
                   ": grad_output must have the input's dtype ", dtype_name(input.scalar_type()),
                   ", got ", dtype_name(grad_output.scalar_type()));
  TORCH_CHECK(grad_output.device() == input.device(), "fusedbn.", op,
              ": grad_output must be on the input's device ", input.device(), ", got ",
              grad_output.device());
}

// The arguments of the backward ops (backward, backward_elemt): input, grad_output, weight and the
// saved statistics mean and invstd.
inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd, const char* op) {
  check_input(input, op);
  check_grad_output(grad_output, input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(invstd, "invstd", input, op);
}

// The arguments of backward_elemt beyond those of backward: the global sums of every rank.
inline void check_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                      const char* op) {
  check_backward_args(grad_output, input, weight, mean, invstd, op);
  check_stat_tensor(sum_dy, "sum_dy", input, op);
  check_stat_tensor(sum_dy_xmu, "sum_dy_xmu", input, op);
}

// The running statistics and eps of the eval-mode forwards (forward_eval, act_forward_eval).
inline void check_eval_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& input, double eps, const char* op) {
  check_channel_tensor(running_mean, "running_mean", input, op);
  check_channel_tensor(running_var, "running_var", input, op);
  TORCH_CHECK(eps >= 0, "fusedbn.", op, ": eps must be non-negative, got ", eps);
}

// count of backward_elemt: the values per channel over all ranks, so at least this input's own.
inline void check_sync_count(int64_t count, const Geometry& g, const char* op) {
  TORCH_CHECK(count >= g.rows(), "fusedbn.", op,
              ": count must be the number of values per channel over all ranks, at least this "
              "input's ", g.rows(), " (N * spatial size), got ", count);
}

inline bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Output allocated in the layout the kernels write: the input's memory format.
inline at::Tensor empty_output(const at::Tensor& canonical_input) {
  return at::empty_like(canonical_input, at::MemoryFormat::Preserve);
}

// grad_output with exactly the strides of the canonical input x, so that one offset addresses both.
inline at::Tensor match_layout(const at::Tensor& grad_output, const at::Tensor& x) {
  if (grad_output.strides() == x.strides()) return grad_output;
  return at::empty_like(x, at::MemoryFormat::Preserve).copy_(grad_output);
}

// The count of the running-statistics update: values per channel of (N, C, *) input (0 for none).
inline int64_t update_count(const at::Tensor& input) {
  const int64_t C = input.dim() >= 2 ? input.size(1) : 0;
  return C > 0 ? input.numel() / C : 0;
}

// Arguments of update_running_stats, for every backend.
inline void check_update_running_stats_args(const at::Tensor& running_mean,
                                            const at::Tensor& running_var, const at::Tensor& mean,
                                            const at::Tensor& var, int64_t count,
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
  TORCH_CHECK(var.device() == mean.device(), "fusedbn.", op,
              ": var must be on the statistics' device ", mean.device(), ", got ", var.device());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_mean,
                                                                          "running_mean"},
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
  if (momentum.has_value()) return;
  TORCH_CHECK(defined(num_batches_tracked), "fusedbn.", op,
              ": num_batches_tracked must be given when momentum is None (cumulative average)");
  const at::Tensor& nbt = *num_batches_tracked;
  TORCH_CHECK(nbt.numel() == 1 && nbt.device() == mean.device(), "fusedbn.", op,
              ": num_batches_tracked must be a one-element tensor on ", mean.device(), ", got ",
              nbt.sizes(), " on ", nbt.device());
  // (Its value is not checked: reading it would synchronize on CUDA. Below 1 it counts as 1, on
  // every backend: cumulative_average_factor.)
}

// The cumulative-average factor 1 / num_batches_tracked of momentum=None. A count below 1 (0 or
// negative, from a hand-edited state_dict; NaN) counts as 1, the first batch: factor 1, the
// running statistics become the batch's (where torch divides by zero or weights by a negative
// factor). Host and device code.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline double cumulative_average_factor(double num_batches_tracked) {
  return num_batches_tracked >= 1.0 ? 1.0 / num_batches_tracked : 1.0;
}


}  // namespace fusedbn
