// The default kernel of forward_train_update (schema.cpp): forward_train, then the checks of the
// update, the counter's increment and update_running_stats, each through the dispatcher. Every
// device without a kernel of its own runs it (CUDA, Meta, the emulated CUDA op library of the
// tests); the CPU kernel (cpu/bn_forward.cpp) does the same in one call, without the two further
// dispatches. Compiled into fusedbn._C and, under FUSEDBN_OP_NAMESPACE=fusedbn_emu, into the
// emulated op library (tests/emu_testing.py).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#ifndef FUSEDBN_OP_NAMESPACE
#define FUSEDBN_OP_NAMESPACE fusedbn
#endif
#define FUSEDBN_STR2(x) #x
#define FUSEDBN_STR(x) FUSEDBN_STR2(x)
#define FUSEDBN_OP(name) FUSEDBN_STR(FUSEDBN_OP_NAMESPACE) "::" name
#define FUSEDBN_LIBRARY_IMPL_KEY(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace fusedbn {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats forward_train_update_composite(const at::Tensor& input, const OptTensor& weight,
                                     const OptTensor& bias, const at::Tensor& running_mean,
                                     const at::Tensor& running_var,
                                     const OptTensor& num_batches_tracked,
                                     std::optional<double> momentum, double eps) {
  static const auto forward = c10::Dispatcher::singleton()
      .findSchemaOrThrow(FUSEDBN_OP("forward_train"), "")
      .typed<Stats(const at::Tensor&, const OptTensor&, const OptTensor&, double)>();
  static const auto update = c10::Dispatcher::singleton()
      .findSchemaOrThrow(FUSEDBN_OP("update_running_stats"), "")
      .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  c10::SymInt, std::optional<double>, const OptTensor&)>();
  Stats out = forward.call(input, weight, bias, eps);
  const at::Tensor& mean = std::get<1>(out);
  const at::Tensor& var = std::get<3>(out);
  const OptTensor batches = momentum.has_value() ? std::nullopt : num_batches_tracked;
  c10::SymInt count = 0;
  if (input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    // A trace with symbolic shapes (nothing real is written): each op's fake kernel checks its
    // own arguments.
    const c10::SymInt C = input.sym_size(1);
    if (C != 0) count = input.sym_numel() / C;
  } else {
    count = update_count(input);
    // Every check of the update before the counter moves: a rejected batch is not counted.
    check_update_running_stats_args(running_mean, running_var, mean, var, count.expect_int(),
                                    momentum, batches);
  }
  if (defined(num_batches_tracked)) num_batches_tracked->add_(1);
  update.call(running_mean, running_var, mean, var, count, momentum, batches);
  return out;
}

}  // namespace
}  // namespace fusedbn

FUSEDBN_LIBRARY_IMPL_KEY(FUSEDBN_OP_NAMESPACE, CompositeExplicitAutograd, m) {
  m.impl("forward_train_update", &fusedbn::forward_train_update_composite);
}
