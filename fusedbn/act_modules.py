"""Batch norm + optional residual add + activation in one module:

    bn = fusedbn.FusedBatchNormAct2d(64, activation="relu")
    y = bn(x)                    # relu(bn(x))
    y = bn(x, residual=r)        # relu(bn(x) + r)   (a ResNet block's end)

FusedBatchNormAct1d/2d/3d are FusedBatchNorm1d/2d/3d (so nn.BatchNorm1d/2d/3d: isinstance holds)
with the same constructor plus keyword-only `activation`, `negative_slope` and `memory_saving`,
and the very same parameters, buffers and state_dict keys: weights of nn.BatchNorm2d load 1:1 and
the weight stays the ordinary signed gamma (no |gamma| + eps reparameterization as in inplace_abn).
The activation is configuration, not state.

`activation` takes what timm's BatchNormAct2d users pass as act_layer: a name ("relu",
"leaky_relu", "silu", "gelu_tanh", "identity"), None (identity), or an activation module class or
instance (nn.ReLU, nn.LeakyReLU(0.2), nn.SiLU, nn.GELU(approximate="tanh"), nn.Identity); an
instance's own settings (negative_slope) are used. `memory_saving=True` keeps less for the
backward (fusedbn/act_ops.py says what, per activation).

A residual that the fused kernels cannot take -- a different shape (broadcasting), dtype or
device, or not a tensor -- is added the ordinary way after the batch norm, with the same result.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import act_ops, ops
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d

_MODULE_ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu",
                nn.Identity: "identity"}


def resolve_activation(activation, negative_slope=0.01):
    """(name, negative_slope) for an activation given as a name, None, or a module class or
    instance; ValueError for anything fusedbn has no kernel for."""
    if activation is None:
        return "identity", negative_slope
    if isinstance(activation, str):
        name = activation.lower().replace("-", "_")
        name = {"none": "identity", "swish": "silu", "leakyrelu": "leaky_relu"}.get(name, name)
        if name in act_ops.ACTIVATIONS:
            return name, negative_slope
    elif isinstance(activation, nn.Module):
        if isinstance(activation, nn.GELU) and activation.approximate == "tanh":
            return "gelu_tanh", negative_slope
        if isinstance(activation, nn.LeakyReLU):
            return "leaky_relu", float(activation.negative_slope)
        for cls, name in _MODULE_ACTS.items():
            if type(activation) is cls:
                return name, negative_slope
    elif isinstance(activation, type) and activation in _MODULE_ACTS:
        return _MODULE_ACTS[activation], negative_slope
    raise ValueError(
        f"fusedbn: activation must be one of {', '.join(act_ops.ACTIVATIONS)}, None, or "
        "nn.ReLU / nn.LeakyReLU / nn.SiLU / nn.GELU(approximate='tanh') / nn.Identity, got "
        f"{activation!r}")


def apply_activation(z, activation, negative_slope):
    """torch's own activation (the unfused path)."""
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return z


class _FusedBatchNormActMixin:
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation="relu", negative_slope=0.01, memory_saving=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.set_activation(activation, negative_slope, memory_saving)

    def set_activation(self, activation, negative_slope=0.01, memory_saving=None):
        """Sets the activation (and memory_saving when given); returns self."""
        self.activation, self.negative_slope = resolve_activation(activation, negative_slope)
        if memory_saving is not None:
            self.memory_saving = bool(memory_saving)
        return self

    def _fusable_residual(self, input, residual):
        return (isinstance(residual, torch.Tensor) and residual.shape == input.shape
                and residual.dtype == input.dtype and residual.device == input.device)

    def forward(self, input, residual=None):
        if residual is not None and not self._fusable_residual(input, residual):
            z = super().forward(input) + residual  # broadcasting / promotion as torch does it
            return apply_activation(z, self.activation, self.negative_slope)
        try:
            running_mean, running_var, use_batch_stats, momentum, counter = (
                self._batch_norm_args(input))
            # (the op advances the counter once the batch has passed its checks)
            return act_ops.batch_norm_act(
                input, running_mean, running_var, self.weight, self.bias, residual,
                use_batch_stats, momentum, self.eps, self.activation, self.negative_slope,
                self.memory_saving, counter)
        except (RuntimeError, TypeError, ValueError) as e:
            ops.name_entry_point(e, type(self).__name__)  # one prefix: the module's name
            raise

    def extra_repr(self):
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.memory_saving:
            s += ", memory_saving=True"
        return s


class FusedBatchNormAct1d(_FusedBatchNormActMixin, FusedBatchNorm1d):
    """FusedBatchNorm1d followed by an optional residual add and an activation, fused."""


class FusedBatchNormAct2d(_FusedBatchNormActMixin, FusedBatchNorm2d):
    """FusedBatchNorm2d followed by an optional residual add and an activation, fused."""


class FusedBatchNormAct3d(_FusedBatchNormActMixin, FusedBatchNorm3d):
    """FusedBatchNorm3d followed by an optional residual add and an activation, fused."""


ACT_BY_BN = {FusedBatchNorm1d: FusedBatchNormAct1d, FusedBatchNorm2d: FusedBatchNormAct2d,
             FusedBatchNorm3d: FusedBatchNormAct3d}
