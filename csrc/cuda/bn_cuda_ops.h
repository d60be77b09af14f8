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

#include "backend_ops.inc"  // forward_train, forward_eval, backward, update_running_stats,
                             // batch_stats, backward_reduce, backward_elemt

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

}  // namespace cuda
}  // namespace fusedbn
