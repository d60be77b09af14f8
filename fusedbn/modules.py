"""Drop-in batch-norm modules: subclasses of nn.BatchNorm1d/2d/3d (same constructor, parameters,
buffers, state_dict keys and input checks) whose forward runs the fusedbn kernels.

Errors speak of the module the user called: a channel mismatch names the module and its
num_features, and every other message of fusedbn's starts with the module's class name (torch's
own messages, for the input's rank, eps or a single value per channel, keep torch's words)."""
from torch import nn

from . import ops
from .functional import check_eps, check_running_stats, verify_batch_size


def check_channels(module, input, per_channel):
    """Raises when the input's channel count differs from num_features and a per-channel tensor
    of the module (weight, bias, running statistics: those the call uses) does not fit it: the
    message names the module and num_features, as the user wrote them. (Without per-channel
    tensors torch normalizes any channel count, and so does fusedbn.)"""
    C = input.shape[1]
    if all(t is None or t.shape == (C,) for t in per_channel):
        return
    name = type(module).__name__
    raise RuntimeError(
        f"{name}({module.num_features}) expects {module.num_features} channels (num_features), "
        f"got input with {C} channels (input of shape {tuple(input.shape)}, channels in dim 1)")


class _FusedBatchNormMixin:
    """forward() of nn.modules.batchnorm._BatchNorm on the fusedbn kernels. Two deliberate
    differences, neither visible in results: momentum=None reads num_batches_tracked on the device
    instead of syncing it to the host, and num_batches_tracked is incremented only once the batch
    has passed every check, so a rejected batch leaves the module's state untouched."""

    def forward(self, input):
        try:
            running_mean, running_var, use_batch_stats, momentum, counter = (
                self._batch_norm_args(input))
            return ops.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                  use_batch_stats, momentum, self.eps, counter)
        except (RuntimeError, TypeError, ValueError) as e:
            ops.name_entry_point(e, type(self).__name__)
            raise

    def _batch_norm_args(self, input):
        """Checks input and options as nn.BatchNorm does and returns the statistics arguments of
        the op: (running_mean, running_var, use_batch_stats, momentum, counter), counter being
        num_batches_tracked when this step advances it (the op does, once its checks passed).
        (A tuple, not a dict: this runs on every call, and small layers feel every microsecond.)"""
        # (Each buffer is read once: nn.Module attribute lookups of buffers are slow Python.)
        self._check_input_dim(input)
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        if use_batch_stats:
            verify_batch_size(input.size())
        counter = None
        if training:
            if self.track_running_stats:
                counter = self.num_batches_tracked
            else:
                running_mean = running_var = None
        if input.shape[1] != self.num_features:
            check_channels(self, input, (self.weight, self.bias, running_mean, running_var))
        check_eps(self.eps, use_batch_stats)
        check_running_stats(running_mean, running_var, use_batch_stats)
        momentum = self.momentum
        if momentum is None and counter is None:
            momentum = 0.0  # what nn.BatchNorm uses when there is no counter to average with
        return running_mean, running_var, use_batch_stats, momentum, counter


class FusedBatchNorm1d(_FusedBatchNormMixin, nn.BatchNorm1d):
    """Drop-in nn.BatchNorm1d on (N, C) or (N, C, L) input."""


class FusedBatchNorm2d(_FusedBatchNormMixin, nn.BatchNorm2d):
    """Drop-in nn.BatchNorm2d on (N, C, H, W) input, NCHW or channels_last."""


class FusedBatchNorm3d(_FusedBatchNormMixin, nn.BatchNorm3d):
    """Drop-in nn.BatchNorm3d on (N, C, D, H, W) input, NCDHW or channels_last_3d."""
