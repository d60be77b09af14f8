// Host-side checks of the act_* operators (batch norm + residual + activation), shared by the CPU
// and CUDA backends so that both word their errors the same way. The batch-norm arguments
// themselves are checked with common.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <utility>

#include "activation.h"
#include "common.h"

namespace fusedbn {

inline const char* act_name(Act a) {
  switch (a) {
    case Act::kIdentity: return "identity";
    case Act::kRelu: return "relu";
    case Act::kLeakyRelu: return "leaky_relu";
    case Act::kSilu: return "silu";
    case Act::kGeluTanh: return "gelu_tanh";
  }
  return "?";
}

inline Act check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation < kNumActs, "fusedbn.", op,
              ": activation must be 0 (identity), 1 (relu), 2 (leaky_relu), 3 (silu) or "
              "4 (gelu_tanh), got ", activation);
  return static_cast<Act>(activation);
}

// The activations whose backward can read the sign of z from a mask or from the output.
inline bool has_sign_mask(Act act, double slope) {
  return act == Act::kRelu || (act == Act::kLeakyRelu && slope >= 0);
}

// The activations that memory-saving mode can invert (z from y).
inline bool is_invertible(Act act, double slope) {
  return act == Act::kIdentity || (act == Act::kLeakyRelu && slope > 0);
}

inline void check_save_mask(Act act, double slope, bool save_mask, const char* op) {
  TORCH_CHECK(!save_mask || has_sign_mask(act, slope), "fusedbn.", op,
              ": save_mask needs activation relu, or leaky_relu with negative_slope >= 0, got ",
              act_name(act), " with negative_slope ", slope);
}

// A tensor of the input's shape, dtype and device: the residual, or grad_output.
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input,
                             const char* op) {
  TORCH_CHECK(t.sizes() == input.sizes(), "fusedbn.", op, ": ", name,
              " must have the input's shape ", input.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "fusedbn.", op, ": ", name,
                   " must have the input's dtype ", dtype_name(input.scalar_type()), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(), "fusedbn.", op, ": ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
}

inline void check_optional_like_input(const c10::optional<at::Tensor>& t, const char* name,
                                      const at::Tensor& input, const char* op) {
  if (defined(t)) check_like_input(*t, name, input, op);
}

// Packed sign mask: one bit per element, ceil(numel / 8) bytes.
inline int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

inline at::Tensor new_mask(const at::Tensor& input, bool save_mask) {
  return at::empty({save_mask ? mask_bytes(input.numel()) : 0},
                   input.options().dtype(at::kByte));
}

// The arguments of act_backward beyond those of the batch-norm backward.
inline ActSource check_act_backward(const c10::optional<at::Tensor>& mask, int64_t source, Act act,
                                    double slope, const at::Tensor& saved, const char* op) {
  TORCH_CHECK(source >= 0 && source <= 2, "fusedbn.", op,
              ": source must be 0 (input), 1 (input and mask) or 2 (output), got ", source);
  const auto src = static_cast<ActSource>(source);
  if (src == ActSource::kMask) {
    TORCH_CHECK(has_sign_mask(act, slope), "fusedbn.", op,
                ": source 1 (mask) needs activation relu, or leaky_relu with negative_slope >= 0, "
                "got ", act_name(act), " with negative_slope ", slope);
    TORCH_CHECK(defined(mask), "fusedbn.", op, ": source 1 needs the forward's mask, got None");
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kByte, "fusedbn.", op,
                     ": mask must be uint8, got ", dtype_name(mask->scalar_type()));
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == mask_bytes(saved.numel()) &&
                    mask->is_contiguous() && mask->device() == saved.device(),
                "fusedbn.", op, ": mask must be a contiguous (", mask_bytes(saved.numel()),
                ",) tensor on ", saved.device(), " (the forward's), got ", mask->sizes(), " on ",
                mask->device());
  }
  if (src == ActSource::kOutput) {
    TORCH_CHECK(is_invertible(act, slope), "fusedbn.", op,
                ": source 2 (output) needs an invertible activation: identity, or leaky_relu "
                "with negative_slope > 0, got ", act_name(act), " with negative_slope ", slope);
  }
  return src;
}

// All checks of act_forward_train / act_forward_eval beyond the running statistics and eps.
inline Act check_act_forward_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& residual, int64_t activation,
                                  double slope, bool save_mask, const char* op) {
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
  check_optional_like_input(residual, "residual", input, op);
  const Act act = check_activation(activation, op);
  check_save_mask(act, slope, save_mask, op);
  return act;
}

// All checks of act_backward.
inline std::pair<Act, ActSource> check_act_backward_args(
    const at::Tensor& grad_output, const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, int64_t activation, double slope,
    int64_t source, const char* op) {
  check_input(saved, op);
  check_like_input(grad_output, "grad_output", saved, op);
  check_optional_like_input(residual, "residual", saved, op);
  check_optional_channel_tensor(weight, "weight", saved, op);
  check_optional_channel_tensor(bias, "bias", saved, op);
  check_stat_tensor(mean, "mean", saved, op);
  check_stat_tensor(invstd, "invstd", saved, op);
  const Act act = check_activation(activation, op);
  return {act, check_act_backward(mask, source, act, slope, saved, op)};
}

}  // namespace fusedbn
