"""Whole-model conversion between nn.BatchNorm1d/2d/3d and the fusedbn modules.

A converted layer is the same layer under another class: it keeps the very same Parameter and
buffer objects (so optimizers and their state stay valid), requires_grad, train/eval mode, device,
dtype, hooks and any attribute set on it. Only the exact classes are converted: subclasses such as
nn.SyncBatchNorm or a user's own BatchNorm2d subclass are left alone, since their forward may do
something else.
"""
from collections import OrderedDict

from torch import nn

from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d

_TO_FUSED = {
    nn.BatchNorm1d: FusedBatchNorm1d,
    nn.BatchNorm2d: FusedBatchNorm2d,
    nn.BatchNorm3d: FusedBatchNorm3d,
}
_TO_TORCH = {fused: plain for plain, fused in _TO_FUSED.items()}


def _recast(module, cls):
    """A new instance of cls that carries module's state (shared tensors, own containers)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = OrderedDict(module._modules)
    return new


def _swap(module, mapping, memo):
    if id(module) in memo:  # a layer shared by several parents is converted once
        return memo[id(module)]
    cls = mapping.get(type(module))
    result = _recast(module, cls) if cls is not None else module
    memo[id(module)] = result
    for name, child in list(result._modules.items()):
        if child is not None:
            result._modules[name] = _swap(child, mapping, memo)
    return result


def convert_batchnorm(module, fuse_activations=False, memory_saving=False):
    """Replaces every nn.BatchNorm1d/2d/3d in module (recursively, the root included) by the
    matching fusedbn module and returns the result: module itself, changed in place, or the new
    root when module is itself a batch norm.

    fuse_activations=True also finds batch norm -> activation and batch norm -> add -> activation
    chains with torch.fx and replaces them by FusedBatchNormAct modules (fusedbn/fuse_fx.py), with
    a warning naming every layer it leaves unfused for safety. The result is then a new
    torch.fx.GraphModule (or, when module cannot be traced, module with its traceable children
    replaced): use the returned model. Its state_dict has the same keys and tensors.
    memory_saving=True makes the fused modules keep less for the backward (see
    fusedbn/act_ops.py: it matters for invertible activations such as LeakyReLU)."""
    if fuse_activations and not isinstance(module, nn.modules.batchnorm._BatchNorm):
        from .fuse_fx import fuse_activations as fuse
        return fuse(module, lambda m: _swap(m, _TO_FUSED, {}), memory_saving)
    return _swap(module, _TO_FUSED, {})


def revert_batchnorm(module):
    """The reverse of convert_batchnorm: fusedbn modules back to plain nn.BatchNorm1d/2d/3d (for
    export, or for code that needs torch's own implementation). Returns the module."""
    return _swap(module, _TO_TORCH, {})
