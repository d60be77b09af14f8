// The per-channel maps of the element-wise passes (bn_elementwise.cuh describes their
// coefficients), as functors Fn::apply(in0, in1, p) with p the channel's Fn::kParams
// coefficients: the streaming kernels of bn_elementwise.cu and the persistent contiguous kernels
// of bn_persistent_nchw.cuh (which apply them to the tiles they hold) use this one copy.
#pragma once

#include "bn_elementwise.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {

// channel_affine: y = ((x - hi) - lo) * s + b (in1 unused).
template <typename acc_t>
struct AffineFn {
  static constexpr int kInputs = 1;
  static constexpr int kParams = kAffineParams;
  __device__ __forceinline__ static acc_t apply(acc_t x, acc_t, const acc_t (&p)[kParams]) {
    return affine_split(x, p);
  }
};

// channel_grad: dx = (dy - k0) * k1 - (x - k2) * k3 (in0 = dy, in1 = x).
template <typename acc_t>
struct GradFn {
  static constexpr int kInputs = 2;
  static constexpr int kParams = kGradParams;
  __device__ __forceinline__ static acc_t apply(acc_t dy, acc_t x, const acc_t (&p)[kParams]) {
    return grad_dx(dy, x, p);
  }
};

}  // namespace cuda
}  // namespace fusedbn
