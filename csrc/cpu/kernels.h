// The CPU kernels' entry points, registered with TORCH_LIBRARY_IMPL(fusedbn, CPU, m) in register.cpp.
#pragma once

#include "common.h"

#include <array>
#include <tuple>

namespace fusedbn::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps);

at::Tensor forward_eval(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask);

// backward with grad_input written into grad_input_out (undefined: a new tensor), which may be
// grad_output itself (every value of grad_output is read before its grad_input is written) and
// must have the strides of the canonical input. Used by the fused activation backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask,
    const at::Tensor& grad_input_out);

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked);

// bn_sync.cpp: the local pieces of synchronized batch norm.
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input);

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                   const at::Tensor& input, const at::Tensor& mean);

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count);

}  // namespace fusedbn::cpu
