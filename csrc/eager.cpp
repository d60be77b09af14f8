// The eager path of the batch-norm modules and fusedbn.functional: one call from Python that checks
// the running statistics, runs the forward operator(s) and, when a gradient is needed, records a
// C++ autograd node whose backward runs the backward operator.
//
// Why not only the Python autograd.Function of fusedbn/ops.py (which torch.compile still traces):
// on layers of ~1 ms (a 7x7 or 14x14 layer on the CPU) the Python around the kernels -- the
// Function's context, two operator calls through torch.ops, the node's Python backward -- cost
// ~0.2-0.3 ms per step with cold caches, as much as the difference between fusedbn's kernels and
// torch's. Here it is a few C++ calls. The operators are called through the dispatcher, so the
// kernels of the input's device run (CPU or CUDA) and dispatcher-level tools (FakeTensor, meta,
// __torch_dispatch__ modes) see the same operators as before.
//
// Double backward (create_graph=True) is the one thing left to Python: the backward then calls
// fusedbn.double_backward.BatchNormBackward.apply, registered at import with
// set_double_backward, which records the differentiable backward-of-backward.
#include "common.h"
#include "eager.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/rsqrt.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <optional>
#include <tuple>

namespace fusedbn {
namespace {

using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- the operators (schemas in schema.cpp), looked up once -------------------------------------

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& forward_train_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, double)>("fusedbn::forward_train");
  return op;
}

const auto& forward_eval_op() {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                            const at::Tensor&, const at::Tensor&, double)>(
      "fusedbn::forward_eval");
  return op;
}

const auto& backward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      bool, std::array<bool, 3>)>("fusedbn::backward");
  return op;
}

const auto& forward_train_update_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const OptTensor&, std::optional<double>, double)>("fusedbn::forward_train_update");
  return op;
}

// ---- forward -----------------------------------------------------------------------------------

// The arguments that are not differentiated (a struct, so the autograd Function sees one
// non-tensor argument).
struct StatsArgs {
  OptTensor running_mean;
  OptTensor running_var;
  // The module's num_batches_tracked when this step advances it (training with
  // track_running_stats): advanced by one once the forward has succeeded, and read as the
  // cumulative-average factor 1/num_batches_tracked when momentum is None.
  OptTensor counter;
  bool use_batch_stats;
  std::optional<double> momentum;
  double eps;
};

// A tensor argument on another device than the input: refused before anything runs. (The kernels
// check devices too, but a mix of devices can dispatch elsewhere first -- a meta tensor among CPU
// ones selects the meta kernel -- and a running statistic on another device would be found only
// by the update, after the forward and the counter.)
void check_same_device(const at::Tensor& input, const OptTensor& t, const char* name) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->device() == input.device(), "fusedbn.batch_norm: ", name,
                " must be on the input's device ", input.device(), ", got ", t->device());
}

// The training forward never sees the running statistics and the update op cannot tell the
// input's dtype: their dtype, shape and device are checked before anything runs (never a partial
// update, never a counted batch).
void check_running_stats(const at::Tensor& input, const at::Tensor& running_mean,
                         const at::Tensor& running_var) {
  const auto dtype = input.scalar_type();
  if (!is_float_dtype(dtype)) return;  // the forward op rejects the input itself, naming it
  check_same_device(input, running_mean, "running_mean");
  check_same_device(input, running_var, "running_var");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"running_mean",
                                                                           running_mean},
                                {"running_var", running_var}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || t.scalar_type() == at::kFloat,
                     "fusedbn.batch_norm: ", name, " must be ", channel_dtypes_allowed(dtype),
                     ", got ", dtype_name(t.scalar_type()));
    if (input.dim() >= 2) {
      const int64_t C = input.size(1);
      TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fusedbn.batch_norm: ", name,
                  " must have shape (", C, ",) to match the ", C,
                  " channels of input (dim 1), got ", t.sizes());
    }
  }
}

// The update of the running statistics takes the unbiased variance of the batch: one value per
// channel cannot update them. (fusedbn.functional and the modules say so first in torch's words;
// this guards the op-level entry, whose update would refuse the count after the forward. Not part
// of check_running_stats: a rank of synchronized batch norm may hold one value per channel.)
void check_update_count(const at::Tensor& input) {
  if (input.dim() < 2 || input.size(1) == 0) return;
  TORCH_CHECK_VALUE(input.numel() != input.size(1), "fusedbn.batch_norm: updating the running "
                    "statistics needs more than 1 value per channel (the unbiased variance of one "
                    "value is undefined), got input size ", input.sizes());
}

// The module's num_batches_tracked, when this step advances it and momentum is None: the update
// reads it on the device as 1/num_batches_tracked, so it must be one value on the input's device.
void check_counter(const at::Tensor& input, const at::Tensor& counter) {
  TORCH_CHECK(counter.numel() == 1 && counter.device() == input.device(),
              "fusedbn.batch_norm: num_batches_tracked must be a one-element tensor on the "
              "input's device ", input.device(), " when momentum is None, got ", counter.sizes(),
              " on ", counter.device());
}

// (output, mean, invstd); the statistics only when backward needs them (in training they come
// from the forward for free; in eval they are made from the running statistics).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(const at::Tensor& input,
                                                           const OptTensor& weight,
                                                           const OptTensor& bias,
                                                           const StatsArgs& s,
                                                           bool stats_for_backward) {
  if (s.use_batch_stats) {
    if (s.running_mean.has_value()) {
      check_running_stats(input, *s.running_mean, *s.running_var);
      check_update_count(input);
      // The forward, the counter and the update in one op, which checks everything before the
      // counter moves: a rejected batch is not counted.
      auto [output, mean, invstd, var] = forward_train_update_op().call(
          input, weight, bias, *s.running_mean, *s.running_var, s.counter, s.momentum, s.eps);
      return {std::move(output), std::move(mean), std::move(invstd)};
    }
    auto [output, mean, invstd, var] = forward_train_op().call(input, weight, bias, s.eps);
    if (s.counter.has_value()) s.counter->add_(1);
    return {std::move(output), std::move(mean), std::move(invstd)};
  }
  TORCH_CHECK(s.running_mean.has_value() && s.running_var.has_value(),
              "running_mean must be defined in evaluation mode");
  at::Tensor output = forward_eval_op().call(input, weight, bias, *s.running_mean,
                                             *s.running_var, s.eps);
  if (!stats_for_backward) return {std::move(output), at::Tensor(), at::Tensor()};
  const auto acc = acc_dtype(input.scalar_type());
  return {std::move(output), s.running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true),
          at::rsqrt(at::add(s.running_var->to(acc), s.eps))};
}

// ---- autograd ----------------------------------------------------------------------------------

// fusedbn.double_backward.BatchNormBackward.apply, set from Python at import. (Leaked on purpose:
// a py::object destroyed after the interpreter has finalized would crash at exit.)
py::object& double_backward_fn() {
  static auto* fn = new py::object();
  return *fn;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, std::array<bool, 3> mask) {
  py::gil_scoped_acquire gil;
  const py::object& fn = double_backward_fn();
  TORCH_CHECK(fn && !fn.is_none(), "fusedbn: double backward is not available (fusedbn.ops was "
              "not imported)");
  py::tuple grads = fn(grad_output, input, weight, mean, invstd, train,
                       py::make_tuple(mask[0], mask[1], mask[2]));
  return {grads[0].cast<at::Tensor>(), grads[1].cast<at::Tensor>(), grads[2].cast<at::Tensor>()};
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                            const OptTensor& bias, const StatsArgs& s) {
    auto [output, mean, invstd] = run_forward(input, weight, bias, s, /*stats_for_backward=*/true);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["train"] = s.use_batch_stats;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return output;
  }

  // One gradient per argument of forward: input, weight, bias, and none for the statistics.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const OptTensor weight = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const bool train = ctx->saved_data["train"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    // needs_input_grad counts the tensor arguments that were given: input, weight?, bias?.
    const bool has_weight = weight.has_value(), has_bias = bias_dtype >= 0;
    const std::array<bool, 3> mask{
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    auto [dx, dw, db] = at::GradMode::is_enabled()  // create_graph=True
        ? differentiable_backward(grads[0], input, weight, saved[2], saved[3], train, mask)
        : backward_op().call(grads[0], input, weight, saved[2], saved[3], train, mask);
    const auto bias_type = static_cast<c10::ScalarType>(bias_dtype);
    if (mask[2] && db.scalar_type() != bias_type) db = db.to(bias_type);  // weight None, bias given
    return {mask[0] ? dx : at::Tensor(), mask[1] ? dw : at::Tensor(), mask[2] ? db : at::Tensor(),
            at::Tensor()};
  }
};

bool any_requires_grad(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return input.requires_grad() || (weight.has_value() && weight->requires_grad()) ||
         (bias.has_value() && bias->requires_grad());
}

void check_device_supported(const at::Tensor& t) {
  const auto type = t.device().type();
  if (type == c10::DeviceType::CPU) return;
#ifdef FUSEDBN_WITH_CUDA
  if (type == c10::DeviceType::CUDA) return;
  constexpr const char* backends = "cpu, cuda";
#else
  TORCH_CHECK(type != c10::DeviceType::CUDA, "fusedbn: input is on ", t.device(),
              " but this fusedbn was built without CUDA kernels (build_info()['backends'] = "
              "('cpu',)). Rebuild it where a CUDA build of torch and the CUDA toolkit are "
              "installed: `FORCE_CUDA=1 pip install --no-build-isolation .` (set CUDA_HOME if the "
              "toolkit is not in /usr/local/cuda, and TORCH_CUDA_ARCH_LIST, e.g. '9.0', for your "
              "GPU).");
  constexpr const char* backends = "cpu";
#endif
  TORCH_CHECK(false, "fusedbn: no kernels for device type '",
              c10::DeviceTypeName(type, /*lower_case=*/true), "' (this build has ", backends, ")");
}

at::Tensor batch_norm(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& running_mean, const OptTensor& running_var,
                      const OptTensor& counter, bool use_batch_stats,
                      std::optional<double> momentum, double eps) {
  check_device_supported(input);
  // (fusedbn.functional and the modules say this in torch's words first; this guards the op-level
  // entry fusedbn.ops.batch_norm, which would otherwise dereference a missing tensor.)
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "fusedbn.batch_norm: running_mean and running_var must both be tensors or "
                    "both be None");
  check_same_device(input, weight, "weight");
  check_same_device(input, bias, "bias");
  check_same_device(input, running_mean, "running_mean");
  check_same_device(input, running_var, "running_var");
  if (use_batch_stats && counter.has_value() && !momentum.has_value())
    check_counter(input, *counter);
  py::gil_scoped_release no_gil;  // as torch's own bindings do: other Python threads run meanwhile
  StatsArgs s{running_mean, running_var, counter, use_batch_stats, momentum, eps};
  if (at::GradMode::is_enabled() && any_requires_grad(input, weight, bias))
    return BatchNormFunction::apply(input, weight, bias, s);
  // Nothing to differentiate (inference, torch.no_grad): the ops without autograd's bookkeeping.
  return std::get<0>(run_forward(input, weight, bias, s, /*stats_for_backward=*/false));
}

}  // namespace

void bind_eager(py::module_& m) {
  m.def("batch_norm", &batch_norm, py::arg("input"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("counter"),
        py::arg("use_batch_stats"), py::arg("momentum"), py::arg("eps"),
        "Batch norm in eager mode: checks, forward op(s), running-statistics update and a C++ "
        "autograd node (see csrc/eager.cpp).");
  m.def("check_device_supported", &check_device_supported, py::arg("tensor"),
        "Raises a RuntimeError saying what to do when fusedbn has no kernels for the tensor's "
        "device.");
  m.def("check_running_stats", &check_running_stats, py::arg("input"), py::arg("running_mean"),
        py::arg("running_var"),
        "Raises TypeError/RuntimeError naming running_mean or running_var when its dtype, shape or "
        "device does not fit the input.");
  m.def("check_update_count", &check_update_count, py::arg("input"),
        "Raises ValueError when the input has 1 value per channel (no unbiased variance to update "
        "the running statistics with).");
  m.def("check_counter", &check_counter, py::arg("input"), py::arg("counter"),
        "Raises RuntimeError when num_batches_tracked, read by a momentum=None update, is not one "
        "value on the input's device.");
  m.def("set_double_backward", [](py::object fn) { double_backward_fn() = std::move(fn); },
        "Sets the Python callable the C++ backward calls when create_graph=True.");
}

}  // namespace fusedbn
