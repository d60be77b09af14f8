// The one place where fusedbn's operator schemas are declared. Backends add kernels with
// TORCH_LIBRARY_IMPL(fusedbn, CPU|CUDA, m) in their own files; a CPU-only build registers no CUDA
// kernels and the dispatcher reports the missing backend (fusedbn/ops.py turns that into advice).
//
// Conventions shared by every backend:
//  * input is (N, C, *) of float32/float64/float16/bfloat16, any layout; the output keeps the
//    input's memory format (channels_last / channels_last_3d included).
//  * weight/bias/running statistics are float32 or the input's dtype.
//  * mean, invstd and var are per-channel tensors of the accumulation type: float64 for float64
//    input, float32 otherwise.
//  * Differentiable ops are functional; the running-statistics update is its own op, whose
//    mutation is declared in the schema.
#include <torch/library.h>

// The namespace of the library: fusedbn, or fusedbn_emu for the emulated CUDA op library of the
// tests (csrc/cuda/emu/, built with -DFUSEDBN_OP_NAMESPACE=fusedbn_emu), which declares the same
// schemas under its own name so that one process holds both. (TORCH_LIBRARY pastes its first
// argument, so the macro goes through one more expansion.)
#ifndef FUSEDBN_OP_NAMESPACE
#define FUSEDBN_OP_NAMESPACE fusedbn
#endif
#define FUSEDBN_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

FUSEDBN_TORCH_LIBRARY(FUSEDBN_OP_NAMESPACE, m) {
  // Batch statistics (Welford) + normalize + affine in one op.
  // Returns y, the batch mean, 1/sqrt(var + eps) and the biased batch variance (the variance is
  // returned so that the running-statistics update does not have to rebuild it from invstd).
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor mean, Tensor invstd, Tensor var)");
  // forward_train, then the running-statistics update of update_running_stats below: once every
  // argument is checked, num_batches_tracked (when given) advanced by one and the running
  // statistics updated with momentum, or with 1/num_batches_tracked (the advanced count) when
  // momentum is None. The eager path of the modules calls this one op per training step instead
  // of three (forward, counter, update): on small layers those dispatches cost as much as a tenth
  // of the step. The CPU kernel does it in one call; every other device runs the composite of
  // csrc/composite.cpp (the three ops in turn).
  m.def(
      "forward_train_update(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) running_mean,"
      " Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps)"
      " -> (Tensor output, Tensor mean, Tensor invstd, Tensor var)");
  // Normalization with the running statistics (eval mode): a per-channel affine map.
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, float eps) -> Tensor");
  // Backward. train=True: mean/invstd are the batch statistics and dx carries the terms through
  // the statistics; train=False: mean/invstd come from the running statistics, dx = dy*w*invstd.
  // output_mask selects (grad_input, grad_weight, grad_bias); a result not asked for is returned
  // as an empty tensor. grad_weight/grad_bias take weight's dtype (the accumulation type when
  // weight is None).
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd,"
      " bool train, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight,"
      " Tensor grad_bias)");
  // running = (1 - f) * running + f * batch, with the variance made unbiased by count/(count-1).
  // f = momentum, or 1/num_batches_tracked (read on the device) when momentum is None.
  // count == 0 (an empty batch) leaves the statistics untouched, as torch does.
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean,"
      " Tensor var, SymInt count, float? momentum, Tensor? num_batches_tracked) -> ()");

  // ---- the local pieces of synchronized (multi-process) batch norm; fusedbn/sync.py exchanges
  // their results between ranks with torch.distributed and merges them.
  // Their per-channel statistics -- batch_stats' mean and var, backward_reduce's mean and sums,
  // backward_elemt's mean, invstd and sums -- are in the accumulation type of the input's device
  // and dtype, so that what one rank hands to the cross-rank merge is as exact as its reduction:
  // on the CPU float64 for float32 and float64 input, float32 for float16/bfloat16; on CUDA
  // float64 for float64 input, float32 otherwise. (Unlike forward_train's float32 statistics of
  // float32 input on the CPU, which are the op's result, not a partial one.)
  // This rank's batch statistics: per-channel mean and biased variance (M2 / count, 0 for an empty
  // batch) of the N*S values of each channel; the count is known from the shape.
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // This rank's backward sums: per channel, sum(dy) and sum(dy * (x - mean)), mean being the
  // global batch mean. Summed over the ranks they are the sums of the whole batch.
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor mean)"
      " -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // grad_input from the global statistics and the global sums (count: values per channel over
  // all ranks): dx = w * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count),
  // the formula of backward(train=True) with the sums of the whole batch.
  m.def(
      "backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean,"
      " Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, SymInt count) -> Tensor");
  // ---- batch norm + residual add + activation (issue #6; csrc/activation.h has the formulas) ----
  // y = act(BN(x) + residual), residual optional (the input's shape and dtype); `activation` is
  // 0 identity, 1 relu, 2 leaky_relu (negative_slope), 3 silu, 4 gelu_tanh. save_mask=True
  // (relu, leaky_relu with negative_slope >= 0) also returns the packed sign mask: bit e (LSB
  // first, byte e / 8) of the output's e-th element in memory order is set where the backward
  // takes the identity branch; otherwise mask is an empty uint8 tensor.
  m.def(
      "act_forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
      " int activation, float negative_slope, bool save_mask) -> (Tensor output, Tensor mean,"
      " Tensor invstd, Tensor var, Tensor mask)");
  m.def(
      "act_forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, Tensor? residual, float eps, int activation, float negative_slope,"
      " bool save_mask) -> (Tensor output, Tensor mask)");
  // Backward of act_forward_*. `source` says what `saved` is: 0 the input x (z is recomputed
  // from x and residual), 1 the input x with the forward's mask, 2 the output y (memory-saving:
  // z = act^-1(y), x_hat = (z - bias - residual) / weight; identity and leaky_relu with
  // negative_slope > 0 only, weight without zeros). output_mask selects (grad_input,
  // grad_weight, grad_bias, grad_residual); grad_residual is the gradient at the activation's
  // input, dz = grad_output * act'(z).
  m.def(
      "act_backward(Tensor grad_output, Tensor saved, Tensor? residual, Tensor? mask,"
      " Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, bool train, int activation,"
      " float negative_slope, int source, bool[4] output_mask) -> (Tensor grad_input,"
      " Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}
