// The CPU entry points of the fused batch norm + residual add + activation operators (schemas in
// csrc/schema.cpp), registered in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace fusedbn::cpu {

// bn_act_forward.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    double eps, int64_t activation, double negative_slope, bool save_mask);

std::tuple<at::Tensor, at::Tensor> act_forward_eval(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual, double eps,
    int64_t activation, double negative_slope, bool save_mask);

// bn_act_backward.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, int64_t activation,
    double negative_slope, int64_t source, std::array<bool, 4> output_mask);

}  // namespace fusedbn::cpu
