// The CPU kernels' entry points, registered with TORCH_LIBRARY_IMPL(fusedbn, CPU, m) in register.cpp.
#pragma once

#include "common.h"

#include <array>
#include <tuple>

namespace fusedbn::cpu {

#include "backend_ops.inc"  // forward_train, forward_eval, backward, update_running_stats,
                             // batch_stats, backward_reduce, backward_elemt

// backward with grad_input written into grad_input_out (undefined: a new tensor), which may be
// grad_output itself (every value of grad_output is read before its grad_input is written) and
// must have the strides of the canonical input. Used by the fused activation backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> output_mask,
    const at::Tensor& grad_input_out);

// forward_train and update_running_stats in one call (the CPU kernel of forward_train_update;
// other devices run the composite of csrc/composite.cpp): no dispatch for the update or the
// counter's increment.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train_update(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps);

// num_batches_tracked += 1, in place and with its version counter advanced, as add_(1) does (which
// it calls for anything but a one-element CPU tensor of a real dtype).
void advance_counter(const at::Tensor& counter);

}  // namespace fusedbn::cpu
