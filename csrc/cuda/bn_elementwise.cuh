// The element-wise passes of batch norm: a per-channel map over the canonical layout, with
// per-channel coefficients prepared beforehand in the accumulation type, stored [kParams][C]:
//
//   channel_affine:  coefficients (hi, lo, s, b)      y  = ((x - hi) - lo) * s + b
//       forward_train: (shift, shifted mean, invstd * w, bias), the mean split as the statistics
//       hold it (WelfordOp, bn_reduce_ops.cuh: shift = the channel's first value, lo = the mean
//       of x - shift): x - hi is exact for the values near the shift (Sterbenz), so x - mean is
//       taken to the accuracy of lo, not of the mean rounded at its own magnitude (mean 1e4,
//       std 1e-2 in float32: ulp(1e4) ~ 1e-3, a tenth of the spread);
//       forward_eval: (rm, 0, w / sqrt(rv + eps), bias);
//       backward in eval mode: (0, 0, w * invstd, 0) applied to grad_output.
//   channel_grad:    coefficients (k0, k1, k2, k3)    dx = (dy - k0) * k1 - (x - k2) * k3
//       with k0 = sum(dy) / M, k1 = a = w * invstd, k2 = mean,
//       k3 = a * invstd^2 * sum(dy * (x - mean)) / M (the CPU backend's form of
//       w * invstd * (dy - sum_dy / M - xhat * sum(dy * xhat) / M)).
//
// Kernels (bn_elementwise.cu): contiguous layout -> a grid-stride loop over 16-byte vectors of the
// flat tensor; each thread tracks its (position in plane, channel) incrementally, so there is no
// division per element and vectors that cross plane boundaries (7x7 planes) are handled lane by
// lane. channels_last -> threads along C keep their channels' coefficients in registers and
// stride over rows. Both templated on the vector width (16 bytes; channels_last: the widest that
// fits C; 1 when the pointers do not allow one) and the index type (32-bit under 2^31 elements).
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace fusedbn {
namespace cuda {

constexpr int kAffineParams = 4;
constexpr int kGradParams = 4;

// out = affine(in) per channel; in/out share the canonical layout g; params: [4][C] accumulation
// type, contiguous. No-op when numel is 0.
void channel_affine(const at::Tensor& in, const at::Tensor& out, const Geometry& g,
                    const at::Tensor& params);

// dx = (dy - k0) * k1 - (x - k2) * k3 per channel; dy, x, dx share the canonical layout g;
// params: [4][C] accumulation type, contiguous. No-op when numel is 0.
void channel_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                  const Geometry& g, const at::Tensor& params);

}  // namespace cuda
}  // namespace fusedbn
