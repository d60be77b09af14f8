"""fusedbn.FusedSyncBatchNorm: nn.SyncBatchNorm on the fusedbn kernels, and the conversion of a
model's batch norms to it.

A training step of one layer, on every rank of the group (collectives: fusedbn/distributed.py):
  forward   validate the arguments; batch_stats (this rank's mean and variance, Welford) ->
            all_gather of (count, mean, M2) -> exact merge -> forward_eval with the global mean
            and variance (y = (x - mean) * w / sqrt(var + eps) + b) -> update_running_stats with
            the global count (unbiased variance of the whole batch);
  backward  backward_reduce (this rank's sum dy and sum dy * (x - mean)); grad_weight and
            grad_bias from those local sums (each rank's share, as nn.SyncBatchNorm returns them:
            DDP's gradient all-reduce adds them up); all_reduce of the sums -> backward_elemt
            (grad_input from the sums of the whole batch).
With a sum loss, the outputs, the input gradients and the running statistics are those of one
process running nn.BatchNorm on the concatenated batch, and the parameter gradients add up to its.
The per-rank statistics and sums travel in the pieces' accumulation type (ops.sync_stat_dtype:
float64 for float32 input on the CPU, as torch's CPU kernels accumulate it; float32 on CUDA), and
the merge is float64, so that the exchange costs the statistics no precision.
"""
import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .convert import _recast
from .functional import check_eps
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d,
                      _FusedBatchNormMixin)
from .ops import _check_device_supported, _check_running_stats, acc_dtype, sync_stat_dtype

_ops = torch.ops.fusedbn


def _values_per_channel(input):
    return input.numel() // input.shape[1] if input.shape[1] else 0


def _local_stats(input, weight, bias, running_mean, running_var, eps, num_features):
    """Every check of the step, then this rank's (count, mean, var). Runs before the exchange, so
    that a bad argument fails on its own rank while the peers learn of it (see distributed.py)."""
    if input.dim() < 2:  # nn.SyncBatchNorm's wording
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.shape[1] != num_features:
        raise ValueError(
            f"fusedbn.FusedSyncBatchNorm: input has {input.shape[1]} channels (dim 1 of shape "
            f"{list(input.shape)}) but the layer has num_features={num_features}")
    check_eps(eps, True)
    _check_device_supported(input)
    if running_mean is not None:
        _check_running_stats(input, running_mean, running_var)
    mean, var = _ops.batch_stats(input)  # checks the input's dtype
    # The kernels' own checks of weight and bias (shape, dtype, device), run on an empty slice of
    # the input now rather than after the exchange (forward_eval takes float32 statistics or the
    # input's dtype).
    stat = mean.to(acc_dtype(input.dtype))
    _ops.forward_eval(input[:0], weight, bias, stat, stat, eps)
    return _values_per_channel(input), mean, var


def _packet_device(input, *tensors):
    """Where the layer lives (its parameters or buffers), else the input's device."""
    return next((t.device for t in tensors if t is not None), input.device)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) with the statistics of the batch of every rank of `group`; updates the
    running statistics in place (num_batches_tracked too, when given)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group, num_features):
        mean64, var64, total = distributed.gather_batch_stats(
            lambda: _local_stats(input, weight, bias, running_mean, running_var, eps, num_features),
            num_features, _packet_device(input, weight, running_mean), group)
        if total == 1:  # every rank knows the total: all of them raise, none waits
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over all ranks (input size on this rank {list(input.shape)})")
        invstd64 = torch.rsqrt(var64 + eps)
        acc = acc_dtype(input.dtype)  # the statistics forward_eval takes
        mean_eval, bias_eval = mean64.to(acc), bias
        sync = sync_stat_dtype(input)  # those backward_reduce and backward_elemt take
        if sync != acc:
            # float32 input on the CPU: y = (x - m) s + b = (x - float32(m)) s + (b - lo s) with
            # lo = m - float32(m), s = w invstd. forward_eval subtracts float32(m) exactly (for x
            # near the mean), so the bias carries the mean's rounding error instead of the output
            # (|mean| / std = 1e4: 3e-4 of the output's unit otherwise, 6x torch's own error).
            scale64 = invstd64 if weight is None else weight.double() * invstd64
            b64 = bias.double() if bias is not None else torch.zeros_like(mean64)
            bias_eval = (b64 - (mean64 - mean_eval.double()) * scale64).to(acc)
        output = _ops.forward_eval(input, weight, bias_eval, mean_eval, var64.to(acc), eps)
        mean, invstd = mean64.to(sync), invstd64.to(sync)
        if running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            _ops.update_running_stats(running_mean, running_var, mean64, var64, total, momentum,
                                      num_batches_tracked if momentum is None else None)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total = total
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "fusedbn.FusedSyncBatchNorm: double backward (create_graph=True) is not supported "
                "across processes; FusedBatchNorm supports it on one process")
        input, weight, mean, invstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        sum_dy, sum_dy_xmu = _ops.backward_reduce(grad_output, input, mean)
        if need_dw and weight is not None:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_db and ctx.bias_dtype is not None:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if need_dx:  # every rank of the group must agree on this (as with nn.SyncBatchNorm)
            sum_dy, sum_dy_xmu = distributed.all_reduce_grad_sums(sum_dy, sum_dy_xmu, ctx.group)
            grad_input = _ops.backward_elemt(grad_output, input, weight, mean, invstd, sum_dy,
                                             sum_dy_xmu, ctx.total)
        return (grad_input, grad_weight, grad_bias) + (None,) * 7


class FusedSyncBatchNorm(_FusedBatchNormMixin, nn.SyncBatchNorm):
    """Drop-in nn.SyncBatchNorm on the fusedbn kernels: same constructor (num_features, eps,
    momentum, affine, track_running_stats, process_group, device, dtype), parameters, buffers and
    state_dict; (N, C, *) input of any layout on the CPU or a GPU.

    In training, when torch.distributed is initialized and the group (process_group, default the
    whole world) has more than one rank, the batch statistics are those of the batches of all
    ranks (uneven and empty batches included), with one all_gather in the forward and one
    all_reduce in the backward. Otherwise -- eval mode, one process, a group of one -- it is
    FusedBatchNorm on the local batch, as nn.SyncBatchNorm falls back to F.batch_norm.
    A rank with a bad input raises its own error and the others a RankFailedError naming it.
    """

    def _sync_group(self):
        """The process group to synchronize over, or None for the local path."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world < 0:
            raise RuntimeError(
                f"fusedbn.FusedSyncBatchNorm: global rank {dist.get_rank()} is not a member of "
                "this layer's process_group; every rank that runs the layer must belong to it")
        return group if world > 1 else None

    def forward(self, input):
        group = self._sync_group()
        if group is None:
            return super().forward(input)  # FusedBatchNorm on this rank's batch
        update = self.track_running_stats
        momentum = self.momentum
        num_batches_tracked = self.num_batches_tracked if update else None
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # what nn.BatchNorm uses when there is no counter to average with
        return SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, num_batches_tracked, momentum, self.eps, group,
            self.num_features)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every batch norm of module (recursively, the root included) by its
        synchronized counterpart and returns the result (module itself, changed in place, or the
        new root). Like nn.SyncBatchNorm.convert_sync_batchnorm, but it keeps the fusedbn kernels
        and any fused activation:

        * nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, FusedBatchNorm1d/2d/3d -> FusedSyncBatchNorm;
        * any other class that declares its counterpart as an attribute of its own (set on the
          class itself, not inherited), `Cls.sync_batchnorm_class = SyncCls`, -> that class. This
          is the hook for fusedbn modules with a fused activation: their sync variant keeps the
          activation. A class declaring itself (a sync class) just gets the new process_group;
        * everything else is left alone -- subclasses included, since their forward may do
          something the counterpart does not (torch's version turns them into a plain
          SyncBatchNorm, silently dropping, say, a fused activation).
        A converted layer keeps the very same parameter and buffer objects, requires_grad,
        train/eval mode, device, dtype, hooks and attributes (fusedbn.convert_batchnorm's rules),
        with process_group set."""
        return _convert(module, process_group, {})


# Classes that cannot declare a counterpart themselves (torch's), and fusedbn's own.
_SYNC_COUNTERPART = {
    nn.BatchNorm1d: FusedSyncBatchNorm,
    nn.BatchNorm2d: FusedSyncBatchNorm,
    nn.BatchNorm3d: FusedSyncBatchNorm,
    nn.SyncBatchNorm: FusedSyncBatchNorm,
}
for _cls in (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d):
    _cls.sync_batchnorm_class = FusedSyncBatchNorm
FusedSyncBatchNorm.sync_batchnorm_class = FusedSyncBatchNorm


def sync_counterpart(cls):
    """The synchronized class that cls converts to, or None. Declarations are not inherited: a
    subclass must declare its own."""
    return vars(cls).get("sync_batchnorm_class") or _SYNC_COUNTERPART.get(cls)


def _convert(module, process_group, memo):
    if id(module) in memo:  # a layer shared by several parents is converted once
        return memo[id(module)]
    target = sync_counterpart(type(module))
    result = module
    if target is not None:
        result = _recast(module, target) if target is not type(module) else module
        result.process_group = process_group
    memo[id(module)] = result
    for name, child in list(result._modules.items()):
        if child is not None:
            result._modules[name] = _convert(child, process_group, memo)
    return result
