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

#include "backend_act_ops.inc"  // act_forward_train, act_forward_eval, act_backward

}  // namespace cuda
}  // namespace fusedbn
