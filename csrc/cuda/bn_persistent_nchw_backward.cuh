// The persistent single-read training backward (issue 15) for the contiguous layout (N, C, S):
// NCHW, NCDHW and (N, C, L). The forward's body and planner (bn_persistent_nchw.cuh:
// persistent_nchw_body, plan_persistent_nchw) with GradOp and two tiles, dy and x, held in shared
// memory from their one read to the write of dx; one cooperative launch per slab of CTA columns,
// every CTA of it co-resident:
//   1. per unit (a packed group of whole small planes, or one channel's planes cut into
//      segments, as the streaming pass 1 cuts them): the saved mean of its channels read once per
//      CTA into shared memory (GradOp's parameter); the windows of dy and x of the CTA's samples
//      loaded into the two tiles, growing per-slot GradOp states on the way (the compensated sums
//      of dy and dy * (x - mean), push_group with the streaming kernels' element ranges); the
//      slots merged in sample order, then per channel in vector order -> partials[c][y];
//   2. grid barrier;
//   3. the column's channels dealt out to its gy CTAs, a warp per channel merging its gy
//      partials in a fixed order, and the streaming path's epilogue (BackwardEpilogue of
//      bn_backward.cu: GradEpilogueBase's grad_weight, grad_bias and the dx coefficients k0, a,
//      mean, k3);
//   4. grid barrier;
//   5. per unit: the coefficients of its channels read once into shared memory, dx =
//      (dy - k0) * a - (x - mean) * k3 (channel_grad's map, GradFn) from the tiles, dx written.
// Global traffic: dy and x read once each, dx written once; per channel: the mean read once per
// CTA row (gy C values) and once by the epilogue, invstd and weight once, grad_weight / grad_bias
// written once, partials C * gy written and read, coefficients 4 C written and 4 C per CTA row
// read.
// Numerics: the per-value compensated sums, the merges and the dx map are the streaming path's;
// only the partition of the samples into partials differs (contiguous ranges per CTA instead of
// interleaved samples, a plane's segments merged within the CTA), which changes the rounding of
// the compensated sums at O(eps^2), not their error bound.
// Used for training mode with dx asked for (bn_backward.cu); the tiles take 2 * |dy| bytes, so
// about half the values of the forward's fit; a tensor none of whose slabs fits, or a
// cooperative launch that is refused, leaves the streaming path to the caller.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "bn_persistent_nchw.cuh"
#include "bn_reduce_ops.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {

// At least one block per SM (the tiles make it one or two in practice): without the bound ptxas
// held the scalar 64-bit-index instantiations to 80 registers (three blocks per SM) and spilled;
// with it they take 100, no spill.
template <typename T, int V, typename index_t, class Epilogue, class Store, class Op>
__global__ void __launch_bounds__(kBlockThreads, 1) persistent_nchw_backward_kernel(
    const PersistentNchwArgs<T, at::opmath_type<T>, GradPartial<at::opmath_type<T>>> a,
    const Epilogue epi, const Store store) {
  persistent_nchw_body<Op, V, index_t>(a, epi, store);
}

// The persistent training backward over the contiguous dy, x [N][C][S] -> dx, running epi (the
// streaming path's BackwardEpilogue, writing grad_weight / grad_bias as asked and the dx
// coefficients to coeffs) once per channel; mean: the saved mean. Returns false, having written
// nothing, when no slab fits or a launch is refused (the caller runs the streaming path, which
// rewrites every output).
// Op: GradOp (backward), or act_backward's MaskedGradOp (bn_act_backward.cu: dz = dy masked as
// it is loaded, ex its mask and slope; the tile of dy holds dz), Store: MapStore<GradFn> (dx),
// or act_backward's (dx and grad_residual).
template <typename T, class Epilogue, class Op = GradOp<T>,
          class Store = MapStore<GradFn<at::opmath_type<T>>>>
bool persistent_nchw_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                              const Geometry& g, const at::opmath_type<T>* mean,
                              const Epilogue& epi, const at::Tensor& coeffs,
                              const Store& store = Store(),
                              const ReduceExtras& ex = ReduceExtras()) {
  auto kernel_of = [](auto vtag, auto itag) {
    return persistent_nchw_backward_kernel<T, decltype(vtag)::value,
                                           typename decltype(itag)::type, Epilogue, Store, Op>;
  };
  return persistent_nchw_run<Op>(kernel_of, dy, x, dx, g, mean, epi, coeffs, store, ex);
}

}  // namespace cuda
}  // namespace fusedbn
