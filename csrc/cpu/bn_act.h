// The CPU entry points of the fused batch norm + residual add + activation operators (schemas in
// csrc/schema.cpp), registered in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace fusedbn::cpu {

#include "backend_act_ops.inc"  // act_forward_train, act_forward_eval, act_backward

}  // namespace fusedbn::cpu
