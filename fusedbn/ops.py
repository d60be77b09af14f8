"""Python bindings of the fusedbn operators: device checks, fake (meta) kernels for tracing, and the
autograd Function that the modules and fusedbn.functional call.

The operators themselves (schemas in csrc/schema.cpp) live under torch.ops.fusedbn:
  forward_train(input, weight?, bias?, eps) -> (output, mean, invstd, var)
  forward_eval(input, weight?, bias?, running_mean, running_var, eps) -> output
  backward(grad_output, input, weight?, mean, invstd, train, output_mask) -> (dx, dweight, dbias)
  update_running_stats(running_mean!, running_var!, mean, var, count, momentum?, num_batches_tracked?)
and the local pieces of synchronized batch norm (fusedbn/sync.py exchanges their results):
  batch_stats(input) -> (mean, var)
  backward_reduce(grad_output, input, mean) -> (sum_dy, sum_dy_xmu)
  backward_elemt(grad_output, input, weight?, mean, invstd, sum_dy, sum_dy_xmu, count) -> grad_input
"""
import re

import torch

from . import _ext
from .double_backward import BatchNormBackward

_ops = torch.ops.fusedbn
_C = _ext._C
# The C++ backward of the eager path (csrc/eager.cpp) hands create_graph=True backwards to this.
_C.set_double_backward(BatchNormBackward.apply)
# Looked up once (a cold module attribute chain costs microseconds per call); dynamo still
# recognizes the function and traces it as True.
_is_compiling = torch.compiler.is_compiling


# Read once at import: a constant for torch.compile to trace through.
_BACKENDS = frozenset(_ext.build_info()["backends"])

# The prefixes of fusedbn's own messages: "fusedbn: ", "fusedbn.<op>: ", "fusedbn.ops.batch_norm: "
ENTRY = "fusedbn.ops.batch_norm"
_PREFIX = re.compile(r"^fusedbn(\.\w+)*: ")


def name_entry_point(error, entry):
    """Puts the public entry point the user called (fusedbn.functional.batch_norm,
    FusedBatchNorm2d, ...) in front of a fusedbn message instead of the operator that checked
    it (fusedbn.forward_train, fusedbn.batch_norm, ...), so that one call's messages share one
    prefix. Changes the exception in place (the caller re-raises it, traceback intact); messages
    that are not fusedbn's (torch's own wording) are left alone."""
    if error.args and isinstance(error.args[0], str):
        text = _PREFIX.sub(lambda _: entry + ": ", error.args[0], count=1)
        error.args = (text,) + error.args[1:]


def _check_device_supported(tensor):
    """Raises a RuntimeError saying what to do when fusedbn has no kernels for tensor's device
    (the wording lives in csrc/eager.cpp, where the eager path checks it). The test itself stays
    in Python, which torch.compile traces to a constant."""
    if tensor.device.type not in _BACKENDS:
        _C.check_device_supported(tensor)


def acc_dtype(dtype):
    """The accumulation dtype of the statistics for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sync_stat_dtype(input):
    """The dtype of the synchronized pieces' statistics (batch_stats, backward_reduce,
    backward_elemt; csrc/schema.cpp): the accumulation type of the input's device and dtype -- on
    the CPU float64 for float32 and float64 input, float32 for float16/bfloat16; on CUDA float64
    for float64 input, float32 otherwise."""
    if input.device.type == "cpu" and input.dtype == torch.float32:
        return torch.float64
    return acc_dtype(input.dtype)


# ---- fake kernels: shapes, dtypes and strides of the real ones, for torch.compile tracing ----------

def _is_channels_last_dense(t):
    if t.dim() < 3:
        return False
    expected = 1
    for d in [1] + list(range(t.dim() - 1, 1, -1)) + [0]:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _empty_output(input):
    """The output layout the kernels produce: the input's own when it is contiguous or dense
    channels-last, contiguous otherwise."""
    if input.is_contiguous() or _is_channels_last_dense(input):
        return torch.empty_like(input, memory_format=torch.preserve_format)
    return input.new_empty(input.shape)


def _check_devices(op, input, **tensors):
    """The kernels' device check, in the fake kernels too: these are also the meta kernels, which
    the dispatcher picks for a call that mixes a meta tensor with real ones -- without this check
    a CPU input with a meta weight would return an uninitialized output."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == input.device, lambda: (
                f"fusedbn.{op}: {name} must be on the input's device {input.device}, got "
                f"{t.device}"))


@torch.library.register_fake("fusedbn::forward_train")
def _forward_train_fake(input, weight, bias, eps):
    torch._check(input.dim() >= 2, lambda: "fusedbn.forward_train: input must have at least 2 dimensions")
    _check_devices("forward_train", input, weight=weight, bias=bias)
    stat = input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype))
    return _empty_output(input), stat, stat.new_empty(stat.shape), stat.new_empty(stat.shape)


@torch.library.register_fake("fusedbn::forward_eval")
def _forward_eval_fake(input, weight, bias, running_mean, running_var, eps):
    torch._check(input.dim() >= 2, lambda: "fusedbn.forward_eval: input must have at least 2 dimensions")
    _check_devices("forward_eval", input, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    return _empty_output(input)


@torch.library.register_fake("fusedbn::backward")
def _backward_fake(grad_output, input, weight, mean, invstd, train, output_mask):
    _check_devices("backward", input, grad_output=grad_output, weight=weight, mean=mean,
                   invstd=invstd)
    C = input.shape[1]
    pdtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    dx = _empty_output(input) if output_mask[0] else input.new_empty((0,))
    dw = input.new_empty((C if output_mask[1] else 0,), dtype=pdtype)
    db = input.new_empty((C if output_mask[2] else 0,), dtype=pdtype)
    return dx, dw, db


@torch.library.register_fake("fusedbn::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, mean, var, count, momentum,
                               num_batches_tracked):
    _check_devices("update_running_stats", mean, var=var, running_mean=running_mean,
                   running_var=running_var, num_batches_tracked=num_batches_tracked)
    return None


@torch.library.register_fake("fusedbn::batch_stats")
def _batch_stats_fake(input):
    torch._check(input.dim() >= 2,
                 lambda: "fusedbn.batch_stats: input must have at least 2 dimensions")
    stat = input.new_empty((input.shape[1],), dtype=sync_stat_dtype(input))
    return stat, stat.new_empty(stat.shape)


@torch.library.register_fake("fusedbn::backward_reduce")
def _backward_reduce_fake(grad_output, input, mean):
    _check_devices("backward_reduce", input, grad_output=grad_output, mean=mean)
    stat = input.new_empty((input.shape[1],), dtype=sync_stat_dtype(input))
    return stat, stat.new_empty(stat.shape)


@torch.library.register_fake("fusedbn::backward_elemt")
def _backward_elemt_fake(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    _check_devices("backward_elemt", input, grad_output=grad_output, weight=weight, mean=mean,
                   invstd=invstd, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    return _empty_output(input)


# ---- autograd -------------------------------------------------------------------------------------

def _check_running_stats(input, running_mean, running_var):
    """The training forward never sees the running statistics and the update op cannot tell the
    input's dtype, so their dtype, shape and device are checked here, before the forward runs. The test is Python (torch.compile traces
    it to constants); the error and its wording come from csrc/eager.cpp, which the eager path
    checks with."""
    C = input.shape[1] if input.dim() >= 2 else None
    for t in (running_mean, running_var):
        if (t.dtype not in (input.dtype, torch.float32) or t.device != input.device
                or (C is not None and tuple(t.shape) != (C,))):
            _C.check_running_stats(input, running_mean, running_var)


def _check_counter(input, counter):
    """num_batches_tracked, read by a momentum=None update: one value on the input's device
    (checked before the forward, so that a refused counter is never advanced)."""
    if counter.numel() != 1 or counter.device != input.device:
        _C.check_counter(input, counter)


def _check_step(input, running_mean, running_var, counter, momentum):
    """Everything the running-statistics update could refuse, before anything runs."""
    if running_mean is not None:
        _check_running_stats(input, running_mean, running_var)
        if input.dim() >= 2 and input.shape[1] and input.numel() == input.shape[1]:
            _C.check_update_count(input)  # one value per channel: no unbiased variance
    if counter is not None and momentum is None:
        _check_counter(input, counter)


def _update(input, running_mean, running_var, counter, mean, var, momentum):
    """After the forward op: advance the counter (the batch passed every check), then update the
    running statistics (momentum=None reads the advanced counter on the device)."""
    if counter is not None:
        counter.add_(1)
    if running_mean is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        _ops.update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                  counter if momentum is None else None)


def _forward(input, weight, bias, running_mean, running_var, counter, use_batch_stats, momentum,
             eps, stats_for_backward):
    """The forward ops: (output, mean, invstd), the statistics only when backward will need them
    (always in training, where they come for free). counter: as in batch_norm below."""
    if use_batch_stats:
        _check_step(input, running_mean, running_var, counter, momentum)  # never a partial update
        output, mean, invstd, var = _ops.forward_train(input, weight, bias, eps)
        _update(input, running_mean, running_var, counter, mean, var, momentum)
        return output, mean, invstd
    output = _ops.forward_eval(input, weight, bias, running_mean, running_var, eps)
    if not stats_for_backward:
        return output, None, None
    acc = acc_dtype(input.dtype)
    return output, running_mean.to(acc, copy=True), torch.rsqrt(running_var.to(acc) + eps)


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x); in training mode also updates the running statistics in place."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, counter, use_batch_stats,
                momentum, eps):
        # (grad mode is always off inside forward: needs_input_grad says what backward needs)
        need = ctx.needs_input_grad
        need_stats = need[0] or need[1] or need[2]
        output, mean, invstd = _forward(input, weight, bias, running_mean, running_var, counter,
                                        use_batch_stats, momentum, eps,
                                        stats_for_backward=need_stats)
        ctx.use_batch_stats = use_batch_stats
        ctx.bias_dtype = None if bias is None else bias.dtype
        if need_stats:
            ctx.save_for_backward(input, weight, mean, invstd)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1] and weight is not None, need[2] and ctx.bias_dtype is not None]
        if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiable
            dx, dw, db = BatchNormBackward.apply(grad_output, input, weight, mean, invstd,
                                                 ctx.use_batch_stats, mask)
        else:
            dx, dw, db = _ops.backward(grad_output, input, weight, mean, invstd,
                                       ctx.use_batch_stats, mask)
        if mask[2] and db.dtype != ctx.bias_dtype:  # weight None, bias given
            db = db.to(ctx.bias_dtype)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None)


def batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
               counter=None):
    """The op-level entry: no Python-side validation beyond the device (see fusedbn.functional).
    counter: the module's num_batches_tracked when this step advances it (training with
    track_running_stats); momentum=None then means the cumulative average 1/num_batches_tracked,
    read on the device after the increment. It is advanced only once the batch has passed every
    check, on both paths: a rejected batch leaves no trace.

    Eager calls go to fusedbn._C.batch_norm (csrc/eager.cpp): the same ops with the checks, the
    counter's increment and the autograd node in C++, which on small layers saves as much time as
    the kernels' lead over torch's. torch.compile traces the Python path below instead (dynamo
    cannot look into a C++ call)."""
    if not _is_compiling():
        try:
            return _C.batch_norm(input, weight, bias, running_mean, running_var, counter,
                                 use_batch_stats, momentum, eps)
        except (RuntimeError, TypeError, ValueError) as e:
            name_entry_point(e, ENTRY)
            raise
    _check_device_supported(input)
    if not use_batch_stats:
        counter = None  # (the eager path ignores it there too)
    if torch.is_grad_enabled() and (input.requires_grad
                                    or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, counter,
                                       use_batch_stats, momentum, eps)
    # Nothing to differentiate (inference, torch.no_grad): the ops without autograd's bookkeeping.
    return _forward(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
                    momentum, eps, stats_for_backward=False)[0]
