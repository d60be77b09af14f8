"""The fused batch norm + activation operators and modules beyond numerical parity: float64
gradcheck of every activation x residual x saved-tensor source x train/eval, torch.library.opcheck
of the three operators, the mask's bit layout, the module API (constructor, state_dict, the
activation argument), and every user-facing error."""
import pytest
import torch
import torch.nn as nn

import fusedbn
from fusedbn import act_ops

ops = torch.ops.fusedbn
ACTS = list(act_ops.ACTIVATIONS)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_saving", [False, True], ids=["normal", "memory_saving"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(device, act, residual, memory_saving, train):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 4, 3, 2, **kw).requires_grad_()
    r = torch.randn(3, 4, 3, 2, **kw).requires_grad_() if residual else None
    w = (1 + 0.5 * torch.rand(4, **kw)).requires_grad_()
    b = torch.randn(4, **kw).requires_grad_()
    rm, rv = torch.randn(4, **kw), 0.5 + torch.rand(4, **kw)

    def f(x, w, b, r):
        return act_ops.batch_norm_act(x, None if train else rm, None if train else rv, w, b, r,
                                      train, 0.1, 1e-3, act, 0.3, memory_saving)

    assert torch.autograd.gradcheck(f, (x, w, b, r), eps=1e-6, atol=1e-6)


def test_source_choice():
    w = torch.ones(3)
    assert act_ops.choose_source("relu", 0.0, True, w, torch.float32) == act_ops.SOURCE_MASK
    assert act_ops.choose_source("leaky_relu", 0.1, False, w, torch.float32) == act_ops.SOURCE_MASK
    assert act_ops.choose_source("leaky_relu", 0.1, True, w, torch.float32) == act_ops.SOURCE_OUTPUT
    assert act_ops.choose_source("leaky_relu", -0.1, True, w, torch.float32) == act_ops.SOURCE_INPUT
    assert act_ops.choose_source("identity", 0.0, True, None, torch.float32) == act_ops.SOURCE_OUTPUT
    assert act_ops.choose_source("silu", 0.0, True, w, torch.float32) == act_ops.SOURCE_INPUT
    small = torch.tensor([1.0, 0.05, 1.0])  # fine for float32, below sqrt(eps) of bfloat16
    assert act_ops.choose_source("identity", 0.0, True, small, torch.float32) == act_ops.SOURCE_OUTPUT
    assert act_ops.choose_source("identity", 0.0, True, small, torch.bfloat16) == act_ops.SOURCE_INPUT


@pytest.mark.parametrize("shape", [(2, 3, 5, 3), (2, 8, 1, 3), (3, 10, 13, 11)],
                         ids=["split_path", "planes_of_3", "per_channel_path"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("leaky_relu", 0.1)])
def test_mask_bits(device, act, slope, layout, shape):
    """Bit e (LSB first) of byte e // 8 is the sign of the e-th output value in memory order; relu
    counts NaN as positive (its gradient passes, as torch's), leaky_relu does not. The shapes
    have planes that share mask bytes (S % 8 != 0, S < 8) and a partial last byte, on the CPU's
    split path and on its one-task-per-channel path."""
    x = torch.randn(shape, device=device)
    x[0, 1, 0, 1] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, _, _, _, mask = ops.act_forward_train(x, None, None, None, 1e-5,
                                             act_ops.ACTIVATIONS[act], slope, True)
    flat = y.permute(0, 2, 3, 1).reshape(-1) if layout == "channels_last" else y.reshape(-1)
    bits = ~(flat <= 0) if act == "relu" else flat > 0
    expected = torch.zeros(mask.numel() * 8, dtype=torch.bool, device=device)
    expected[:flat.numel()] = bits
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=device)
    packed = (expected.view(-1, 8).long() * weights).sum(1).to(torch.uint8)
    assert mask.dtype == torch.uint8 and torch.equal(mask, packed)


def opcheck_samples(device):
    x = torch.randn(3, 4, 5, 2, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    y, mean, invstd, _, mask = ops.act_forward_train(x, w, b, r, 1e-5, 1, 0.0, True)
    yl, *_ = ops.act_forward_train(x, w, b, r, 1e-5, 2, 0.1, False)
    dy = torch.randn_like(x)
    return [
        (ops.act_forward_train.default, (x, w, b, r, 1e-5, 1, 0.0, True)),
        (ops.act_forward_train.default, (x_cl, None, None, None, 1e-5, 3, 0.0, False)),
        (ops.act_forward_train.default, (x.bfloat16(), w, b, r.bfloat16(), 1e-5, 2, 0.1, True)),
        (ops.act_forward_eval.default, (x, w, b, rm, rv, r, 1e-5, 4, 0.0, False)),
        (ops.act_forward_eval.default, (x_cl, None, None, rm, rv, None, 0.0, 1, 0.0, True)),
        (ops.act_backward.default, (dy, x, None, mask, w, b, mean, invstd, True, 1, 0.0, 1,
                                    [True, True, True, True])),
        (ops.act_backward.default, (dy, x, r, None, w, b, mean, invstd, False, 3, 0.0, 0,
                                    [True, False, True, True])),
        (ops.act_backward.default, (dy, yl, r, None, w, b, mean, invstd, True, 2, 0.1, 2,
                                    [True, True, True, False])),
        (ops.act_backward.default, (dy, x, None, None, w, b, mean, invstd, True, 0, 0.0, 0,
                                    [False, False, False, True])),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(device, index):
    op, args = opcheck_samples(device)[index]
    results = torch.library.opcheck(op, args)
    assert results and set(results.values()) == {"SUCCESS"}, results


def test_module_api():
    """Constructor of nn.BatchNorm2d (positional too) plus the activation; the state_dict of
    nn.BatchNorm2d, loaded 1:1 both ways; isinstance; the activation in the repr."""
    ref = nn.BatchNorm2d(8, 1e-3, 0.2, True, True)
    bn = fusedbn.FusedBatchNormAct2d(8, 1e-3, 0.2, True, True, activation=nn.LeakyReLU(0.2),
                                     memory_saving=True)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(bn, fusedbn.FusedBatchNorm2d)
    assert (bn.eps, bn.momentum, bn.negative_slope, bn.activation) == (1e-3, 0.2, 0.2, "leaky_relu")
    assert list(bn.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 1.5)
    bn.load_state_dict(ref.state_dict())
    ref.load_state_dict(bn.state_dict())
    assert "activation=leaky_relu, negative_slope=0.2, memory_saving=True" in repr(bn)
    specs = {None: "identity", "ReLU": "relu", nn.SiLU: "silu", nn.SiLU(): "silu",
             nn.GELU(approximate="tanh"): "gelu_tanh", nn.Identity(): "identity", "swish": "silu"}
    for spec, name in specs.items():
        assert fusedbn.FusedBatchNormAct1d(4, activation=spec).activation == name
    assert fusedbn.FusedBatchNormAct3d(4, bias=False).bias is None


@pytest.mark.parametrize("spec", ["tanh", nn.GELU(), nn.ReLU6, 3])
def test_module_rejects_unknown_activation(spec):
    with pytest.raises(ValueError, match=r"^fusedbn: activation must be one of identity, relu"):
        fusedbn.FusedBatchNormAct2d(4, activation=spec)


def test_double_backward_is_refused(device):
    bn = fusedbn.FusedBatchNormAct2d(3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    g, = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        g.sum().backward()


def test_op_argument_errors(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    w = torch.ones(3, device=device)
    y, mean, invstd, _, mask = ops.act_forward_train(x, w, None, None, 1e-5, 1, 0.0, True)
    train = ops.act_forward_train
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_forward_train: residual must have the "
                                           r"input's shape \[4, 3, 2, 2\], got \[4, 3, 2\]"):
        train(x, w, None, x[..., 0], 1e-5, 1, 0.0, False)
    with pytest.raises(TypeError, match=r"^fusedbn\.act_forward_train: residual must have the "
                                        r"input's dtype float32, got float64"):
        train(x, w, None, x.double(), 1e-5, 1, 0.0, False)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_forward_train: activation must be 0 "):
        train(x, w, None, None, 1e-5, 7, 0.0, False)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_forward_eval: save_mask needs "
                                           r"activation relu, or leaky_relu.*got silu"):
        ops.act_forward_eval(x, w, None, mean, invstd, None, 1e-5, 3, 0.0, True)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_forward_train: save_mask needs .*"
                                           r"leaky_relu with negative_slope -0\.1"):
        train(x, w, None, None, 1e-5, 2, -0.1, True)
    back = ops.act_backward
    every = [True, True, True, False]
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: source 1 needs the "
                                           r"forward's mask, got None"):
        back(x, x, None, None, w, None, mean, invstd, True, 1, 0.0, 1, every)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: mask must be a contiguous "
                                           r"\(6,\) tensor"):
        back(x, x, None, mask[:3], w, None, mean, invstd, True, 1, 0.0, 1, every)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: source 2 \(output\) needs "
                                           r"an invertible activation.*got relu"):
        back(x, y, None, None, w, None, mean, invstd, True, 1, 0.0, 2, every)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: source must be 0"):
        back(x, x, None, None, w, None, mean, invstd, True, 1, 0.0, 5, every)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: grad_output must have the "
                                           r"input's shape"):
        back(x[:2], x, None, mask, w, None, mean, invstd, True, 1, 0.0, 1, every)
    if device.type == "cpu":  # CUDA leaves this check to the caller (it would synchronize)
        with pytest.raises(RuntimeError, match=r"^fusedbn\.act_backward: source 2 \(output\) "
                                               r"divides by weight, but weight\[1\] is 0"):
            back(x, y, None, None, torch.tensor([1.0, 0.0, 1.0], device=device), None, mean,
                 invstd, True, 0, 0.0, 2, every)


def test_module_input_errors(device):
    bn = fusedbn.FusedBatchNormAct2d(3).to(device)
    before = int(bn.num_batches_tracked)
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1, device=device))
    assert int(bn.num_batches_tracked) == before
