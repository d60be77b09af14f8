"""Saved-activation bytes (what autograd keeps between forward and backward, counted once per
storage with torch.autograd.graph.saved_tensors_hooks, parameters and buffers left out) of ResNet
basic blocks: torch eager (nn.BatchNorm2d + nn.ReLU(inplace=True), `out += identity`) against the
fused modules, normal and memory-saving.

In units of A = the bytes of one block-sized activation, eager keeps per identity block its input
(conv1), bn1's input, relu1's output (= conv2's input), bn2's input and relu2's output: 5 A.
  fused ReLU: input, bn1's input + 1-bit mask, y1 (conv2 keeps it), bn2's input + mask = 4 A + 2 A/32.
      ReLU cannot do better: the batch-norm backward needs x_hat also where the ReLU is off.
  fused LeakyReLU, memory-saving: input (conv1; it is also the residual), y1 (conv2 and bn1's
      recovery), y2 (bn2's recovery) = 3 A, the floor for a block counted with its input.
In a stack of blocks each block's input is the previous one's output, so the saving grows with
the depth: 2 blocks 9 A -> 5 A (-44 %), each further block 4 A -> 2 A (-50 %).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fusedbn
from act_models import BasicBlock, LeakyBasicBlock, saved_activation_bytes

N, C, HW = 4, 16, 12


def fused(model, memory_saving):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ResNet block fuses without any warning
        return fusedbn.convert_batchnorm(copy.deepcopy(model), fuse_activations=True,
                                         memory_saving=memory_saving)


def block_input(device):
    return torch.randn(N, C, HW, HW, device=device, requires_grad=True)


def units(nbytes):
    return nbytes / (N * C * HW * HW * 4)


STATS = 2 * C * 4  # mean and invstd (float32) of one batch norm, eager and fused alike


def test_single_block_bytes(device):
    x = block_input(device)
    eager, _ = saved_activation_bytes(BasicBlock(C, C).to(device), x)
    relu, _ = saved_activation_bytes(fused(BasicBlock(C, C), True).to(device), x)
    leaky_ms, _ = saved_activation_bytes(fused(LeakyBasicBlock(C, C), True).to(device), x)
    A = N * C * HW * HW * 4
    mask = N * C * HW * HW // 8
    assert eager == 5 * A + 2 * STATS
    assert relu == 4 * A + 2 * mask + 2 * STATS
    assert leaky_ms == 3 * A + 2 * STATS
    print("single block: eager %.3f A, fused relu %.3f A (%.1f%% less), memory-saving leaky_relu "
          "%.3f A (%.2f%% less)" % (units(eager), units(relu), 100 * (1 - relu / eager),
                                    units(leaky_ms), 100 * (1 - leaky_ms / eager)))


@pytest.mark.parametrize("blocks", [2, 3])
def test_memory_saving_stage_reduction(device, blocks):
    """The issue's target: >= 40 % less than nn.BatchNorm2d + nn.ReLU eager, on a ResNet stage."""
    x = block_input(device)
    torch.manual_seed(0)
    eager_model = nn.Sequential(*[BasicBlock(C, C) for _ in range(blocks)]).to(device)
    leaky = nn.Sequential(*[LeakyBasicBlock(C, C) for _ in range(blocks)])
    eager, _ = saved_activation_bytes(eager_model, x)
    ms, y = saved_activation_bytes(fused(leaky, True).to(device), x)
    normal, _ = saved_activation_bytes(fused(leaky, False).to(device), x)
    reduction = 1 - ms / eager
    assert reduction >= 0.40, "memory-saving stage keeps %.3f A vs eager %.3f A" % (
        units(ms), units(eager))
    assert ms < normal
    y.sum().backward()  # the recovered backward runs
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_zero_weight_falls_back_to_saving_the_input(device):
    """A zero (or tiny) gamma, e.g. zero-init residual branches, cannot be inverted: that call
    keeps x as normal mode does, and the gradients -- grad_weight of the zero channel included --
    are those of normal mode."""
    torch.manual_seed(1)
    bn = fusedbn.FusedBatchNormAct2d(C, activation="leaky_relu", memory_saving=True).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[3] = 0
    ref = copy.deepcopy(bn)
    ref.memory_saving = False
    x = torch.randn(N, C, HW, HW, device=device, requires_grad=True)
    r = torch.randn(N, C, HW, HW, device=device, requires_grad=True)
    ms_bytes, y = saved_activation_bytes(bn, x, r, exclude=[x, r])
    normal_bytes, y_ref = saved_activation_bytes(ref, x, r, exclude=[x, r])
    mask = N * C * HW * HW // 8
    assert ms_bytes == normal_bytes == mask + STATS  # x (the input: excluded), mask, stats
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, r, bn.weight, bn.bias], dy)
    g_ref = torch.autograd.grad(y_ref, [x, r, ref.weight, ref.bias], dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g[2][3] != 0  # the zero channel's weight does get a gradient

    with torch.no_grad():
        bn.weight[3] = 0.5
    ms_bytes, _ = saved_activation_bytes(bn, x, r, exclude=[x, r])
    assert ms_bytes == N * C * HW * HW * 4 + STATS  # now the output y (and r, excluded)
