// The CUDA kernels of the fusedbn operators (schemas in csrc/schema.cpp), registered with
// the dispatcher in register.cu. Each takes tensors on one CUDA device (checked, with the CPU
// backend's wording, through common.h) and launches on the current stream without synchronizing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "common.h"

namespace fusedbn {
namespace cuda {

// bn_forward.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps);

at::Tensor forward_eval(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps);

// Pieces of forward_train / forward_eval that the fused batch norm + activation ops reuse
// (bn_forward.cu). train_stats: the split Welford reduction of x (numel > 0) -> mean, invstd,
// var and the normalize coefficients [4][C] (shift, shifted mean, invstd * w, b: the mean split
// in two, bn_elementwise.cuh) in the accumulation type; eval_coeffs: the coefficients
// (rm, 0, w / sqrt(rv + eps), b); empty_invstd: 1/sqrt(eps) as the
// accumulation type rounds it (the invstd of an empty batch).
void train_stats(const at::Tensor& x, const Geometry& g, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, double eps, at::Tensor& mean,
                 at::Tensor& invstd, at::Tensor& var, at::Tensor& coeffs);
void eval_coeffs(const Geometry& g, const at::Tensor& running_mean, const at::Tensor& running_var,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 double eps, at::Tensor& coeffs);
double empty_invstd(double eps, at::ScalarType acc);

// bn_backward.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask);

// bn_running_stats.cu
void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked);

// bn_sync.cu: the local pieces of synchronized batch norm
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input);

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                   const at::Tensor& input,
                                                   const at::Tensor& mean);

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count);

}  // namespace cuda
}  // namespace fusedbn
