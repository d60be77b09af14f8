"""Batch norm + residual add + activation as one op: fake kernels for tracing and the autograd
Function that the FusedBatchNormAct modules call.

    y = act(batch_norm(x) + residual)        residual optional, act one of ACTIVATIONS

The operators (schemas in csrc/schema.cpp):
  act_forward_train(input, weight?, bias?, residual?, eps, activation, negative_slope, save_mask)
      -> (output, mean, invstd, var, mask)
  act_forward_eval(input, weight?, bias?, running_mean, running_var, residual?, eps, activation,
      negative_slope, save_mask) -> (output, mask)
  act_backward(grad_output, saved, residual?, mask?, weight?, bias?, mean, invstd, train,
      activation, negative_slope, source, output_mask[4]) -> (dx, dweight, dbias, dresidual)

What the backward keeps (`source`), per activation, and why:
  relu, leaky_relu (slope >= 0)  x + a 1-bit mask of z > 0 (SOURCE_MASK): dz = dy * act'(z)
      needs only the sign of z. The batch-norm part needs x_hat at every value, also where the
      ReLU is off (grad_input has the term x_hat * mean(dz * x_hat)), so x is kept.
  identity                       x (SOURCE_INPUT): dz = dy.
  silu, gelu_tanh                x and the residual (SOURCE_INPUT): z is recomputed.
  memory_saving=True, identity or leaky_relu (slope > 0): the output y and the residual
      (SOURCE_OUTPUT), as InPlace-ABN: z = y > 0 ? y : y / slope, x_hat = (z - b - r) / w, with
      w the ordinary signed weight. x is not kept. A channel whose |w| is below
      sqrt(eps of the input dtype) (a zero weight, e.g. zero-init residual branches) makes that
      call keep x instead: x_hat is not recoverable there. Relu cannot be inverted (y = 0 says
      nothing about z < 0), so memory-saving relu is the same x + mask as above.
The residual kept by SOURCE_OUTPUT is normally alive anyway (a ResNet's identity branch is the
block input, which the block's first convolution keeps for its own backward).
"""
import math

import torch
from torch.autograd.function import once_differentiable

from . import ops as _base

_ops = torch.ops.fusedbn

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu_tanh": 4}
SOURCE_INPUT, SOURCE_MASK, SOURCE_OUTPUT = 0, 1, 2


def has_sign_mask(activation, negative_slope):
    return activation == "relu" or (activation == "leaky_relu" and negative_slope >= 0)


def is_invertible(activation, negative_slope):
    return activation == "identity" or (activation == "leaky_relu" and negative_slope > 0)


def min_recoverable_weight(dtype):
    """The smallest |weight| for which memory-saving mode recovers x_hat from the output: the
    recovered x_hat carries the output's rounding error times |z| / |w|, so below sqrt(eps) of the
    output dtype (3.5e-4 float32, 0.088 bfloat16) at least half of its bits would be lost."""
    return math.sqrt(torch.finfo(dtype).eps)


def choose_source(activation, negative_slope, memory_saving, weight, dtype):
    """Which tensors the backward keeps (see the module docstring). Reads min |weight| (one small
    device-to-host copy on CUDA) only when memory-saving mode could apply."""
    if memory_saving and is_invertible(activation, negative_slope):
        if weight is None or bool((weight.detach().abs() >= min_recoverable_weight(dtype)).all()):
            return SOURCE_OUTPUT
    if has_sign_mask(activation, negative_slope):
        return SOURCE_MASK
    return SOURCE_INPUT


# ---- fake kernels -------------------------------------------------------------------------------

def _mask_fake(input, save_mask):
    return input.new_empty(((input.numel() + 7) // 8 if save_mask else 0,), dtype=torch.uint8)


@torch.library.register_fake("fusedbn::act_forward_train")
def _act_forward_train_fake(input, weight, bias, residual, eps, activation, negative_slope,
                            save_mask):
    _base._check_devices("act_forward_train", input, residual=residual)
    y, mean, invstd, var = _base._forward_train_fake(input, weight, bias, eps)
    return y, mean, invstd, var, _mask_fake(input, save_mask)


@torch.library.register_fake("fusedbn::act_forward_eval")
def _act_forward_eval_fake(input, weight, bias, running_mean, running_var, residual, eps,
                           activation, negative_slope, save_mask):
    _base._check_devices("act_forward_eval", input, residual=residual)
    y = _base._forward_eval_fake(input, weight, bias, running_mean, running_var, eps)
    return y, _mask_fake(input, save_mask)


@torch.library.register_fake("fusedbn::act_backward")
def _act_backward_fake(grad_output, saved, residual, mask, weight, bias, mean, invstd, train,
                       activation, negative_slope, source, output_mask):
    _base._check_devices("act_backward", saved, residual=residual, mask=mask, bias=bias)
    dx, dw, db = _base._backward_fake(grad_output, saved, weight, mean, invstd, train,
                                      output_mask[:3])
    dr = _base._empty_output(saved) if output_mask[3] else saved.new_empty((0,))
    return dx, dw, db, dr


# ---- autograd -----------------------------------------------------------------------------------

class BatchNormActFunction(torch.autograd.Function):
    """y = act(batch_norm(x) + residual); in training mode also updates the running statistics."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, counter,
                use_batch_stats, momentum, eps, activation, negative_slope, memory_saving):
        code = ACTIVATIONS[activation]
        need_grad = any(ctx.needs_input_grad[:4])
        source = (choose_source(activation, negative_slope, memory_saving, weight, input.dtype)
                  if need_grad else SOURCE_INPUT)
        save_mask = source == SOURCE_MASK
        if use_batch_stats:
            # checked before anything runs: never a partial update, never a counted rejected batch
            _base._check_step(input, running_mean, running_var, counter, momentum)
            output, mean, invstd, var, mask = _ops.act_forward_train(
                input, weight, bias, residual, eps, code, negative_slope, save_mask)
            _base._update(input, running_mean, running_var, counter, mean, var, momentum)
        else:
            output, mask = _ops.act_forward_eval(input, weight, bias, running_mean, running_var,
                                                 residual, eps, code, negative_slope, save_mask)
            mean = invstd = None
            if need_grad:
                acc = _base.acc_dtype(input.dtype)
                mean = running_mean.to(acc, copy=True)
                invstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.train = use_batch_stats
        ctx.code = code
        ctx.negative_slope = negative_slope
        ctx.source = source
        ctx.bias_dtype = None if bias is None else bias.dtype
        if need_grad:
            needs_z = source == SOURCE_OUTPUT or (source == SOURCE_INPUT and code != 0)
            ctx.save_for_backward(output if source == SOURCE_OUTPUT else input,
                                  residual if needs_z else None,
                                  mask if save_mask else None, weight, bias, mean, invstd)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved, residual, mask, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        out_mask = [need[0], need[1] and weight is not None, need[2] and bias is not None, need[3]]
        grad_residual = None
        if ctx.code == 0 and need[3]:  # identity: the residual's gradient is grad_output itself
            grad_residual, out_mask[3] = grad_output, False
        dx = dw = db = None
        if any(out_mask):
            dx, dw, db, dr = _ops.act_backward(grad_output, saved, residual, mask, weight, bias,
                                               mean, invstd, ctx.train, ctx.code,
                                               ctx.negative_slope, ctx.source, out_mask)
            if out_mask[3]:
                grad_residual = dr
            if out_mask[2] and db.dtype != ctx.bias_dtype:  # weight None, bias given
                db = db.to(ctx.bias_dtype)
        return (dx if out_mask[0] else None, dw if out_mask[1] else None,
                db if out_mask[2] else None, grad_residual,
                None, None, None, None, None, None, None, None, None)


def batch_norm_act(input, running_mean, running_var, weight, bias, residual, use_batch_stats,
                   momentum, eps, activation="relu", negative_slope=0.01, memory_saving=False,
                   counter=None):
    """The op-level entry (the modules validate their arguments first). counter: the module's
    num_batches_tracked when this step advances it (training with track_running_stats), advanced
    once the batch has passed every check; momentum=None reads it, advanced, as the cumulative
    average 1/num_batches_tracked (as fusedbn.ops.batch_norm)."""
    _base._check_device_supported(input)
    if not use_batch_stats:
        counter = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusedbn.batch_norm_act: activation must be one of "
                         f"{', '.join(ACTIVATIONS)}, got {activation!r}")
    return BatchNormActFunction.apply(input, weight, bias, residual, running_mean, running_var,
                                      counter, use_batch_stats, momentum, eps,
                                      activation, float(negative_slope), bool(memory_saving))
