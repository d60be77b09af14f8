// The CUDA kernels of the fused batch norm + residual add + activation operators (schemas in
// csrc/schema.cpp), registered in bn_act_register.cu. Same checks and semantics as the CPU
// backend (csrc/cpu/bn_act.h); launched on the current stream without synchronizing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <tuple>

namespace fusedbn {
namespace cuda {

// bn_act_forward.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    double eps, int64_t activation, double negative_slope, bool save_mask);

std::tuple<at::Tensor, at::Tensor> act_forward_eval(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual, double eps,
    int64_t activation, double negative_slope, bool save_mask);

// bn_act_backward.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, int64_t activation,
    double negative_slope, int64_t source, std::array<bool, 4> output_mask);

}  // namespace cuda
}  // namespace fusedbn
