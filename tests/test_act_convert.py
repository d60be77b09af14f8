"""convert_batchnorm(model, fuse_activations=True): on ResNet-18/50-shaped models and tutorial CNNs
(tests/act_models.py) the converted model computes the same outputs, gradients and running
statistics as the original (float64, train and eval), keeps the same state_dict (keys and the
very same tensors), and fuses exactly the chains it should; what it cannot prove safe stays a
plain FusedBatchNorm* with a warning naming the layer."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn
from act_models import FunctionalActs, TutorialCNN, resnet, sequential_cnn

ACT_TYPES = (fusedbn.FusedBatchNormAct1d, fusedbn.FusedBatchNormAct2d, fusedbn.FusedBatchNormAct3d)
PLAIN_TYPES = (fusedbn.FusedBatchNorm1d, fusedbn.FusedBatchNorm2d, fusedbn.FusedBatchNorm3d)


def randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


def convert(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fusedbn.convert_batchnorm(model, fuse_activations=True, **kwargs)
    return out, [str(w.message) for w in caught if "fusedbn" in str(w.message)]


def layers(model):
    fused = {n: m.activation for n, m in model.named_modules() if isinstance(m, ACT_TYPES)}
    plain = [n for n, m in model.named_modules()
             if isinstance(m, PLAIN_TYPES) and not isinstance(m, ACT_TYPES)]
    return fused, plain


def step(model, x):
    """Output, input gradient, named parameter gradients, buffers after one forward/backward."""
    x = x.detach().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(5)).to(y)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


def assert_same_model(original, converted, x):
    for train in (True, False):
        original.train(train)
        converted.train(train)
        y0, dx0, g0, b0 = step(original, x)
        y1, dx1, g1, b1 = step(converted, x)
        tol = dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(y1, y0, **tol)
        torch.testing.assert_close(dx1, dx0, **tol)
        assert g1.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], **tol, msg=lambda m: f"grad of {n}: {m}")
        assert b1.keys() == b0.keys()
        for n in b0:
            torch.testing.assert_close(b1[n], b0[n], **tol, msg=lambda m: f"buffer {n}: {m}")


def check_conversion(model, x, device, expect_fused, expect_plain=(), expect_warnings=0):
    model = randomize(model).to(device=device, dtype=torch.float64)
    x = x.to(device=device, dtype=torch.float64)
    original = copy.deepcopy(model)
    before = model.state_dict()
    converted, warned = convert(model)
    assert len(warned) == expect_warnings, warned
    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:  # the very same tensors: optimizers and checkpoints stay valid
        assert after[k].data_ptr() == before[k].data_ptr(), k
    fused, plain = layers(converted)
    assert fused == expect_fused
    assert sorted(plain) == sorted(expect_plain)
    assert_same_model(original, converted, x)
    return converted, warned


def resnet_layers(depth, convs):
    names = ["bn1"]
    for li, blocks in enumerate([2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]):
        names += [f"layer{li + 1}.{b}.bn{k}" for b in range(blocks) for k in range(1, convs + 1)]
    return dict.fromkeys(names, "relu")


@pytest.mark.parametrize("depth,width", [(18, 4), (50, 2)])
def test_resnet(device, depth, width):
    convs = 2 if depth == 18 else 3
    first = 2 if depth == 18 else 1  # resnet50's layer1 has a downsample too (4x expansion)
    plain = [f"layer{i}.0.downsample.1" for i in range(first, 5)]
    check_conversion(resnet(depth, width), torch.randn(2, 3, 64, 64), device,
                     resnet_layers(depth, convs), plain)


def test_tutorial_cnn(device):
    check_conversion(TutorialCNN(), torch.randn(4, 3, 32, 32), device,
                     {"bn1": "relu", "bn2": "relu", "bn3": "relu"})


def test_sequential_cnn(device):
    check_conversion(sequential_cnn(), torch.randn(3, 3, 12, 12), device,
                     {"1": "relu", "4": "leaky_relu", "7": "silu", "10": "gelu_tanh"})


def test_functional_forms(device):
    converted, _ = check_conversion(
        FunctionalActs(), torch.randn(3, 2, 4, 5, 5), device,
        {"bn3d": "leaky_relu", "bn_a": "silu", "bn1d": "gelu_tanh", "bn_b": "relu"})
    assert converted.bn3d.negative_slope == 0.1


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) + y + F.relu(self.bn2(x))


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x)) + F.relu(self.bn(x * 2))


class AddIntoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        identity = x * 1
        kept = identity
        identity += self.bn(x)  # writes into the tensor that `kept` also names
        return F.relu(identity) + kept


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return F.relu(self.bn(self.body(x)))


@pytest.mark.parametrize("model,fused,plain,needle", [
    (UsedTwice, {"bn2": "relu"}, ["bn"], "bn: its output is used 2 times"),
    (SharedModule, {}, ["bn"], "bn: the module is called at 2 places"),
    (AddIntoResidual, {}, ["bn"], "bn: the in-place add after it writes into the other operand"),
    (Untraceable, {"body.1": "relu"}, ["bn"], "cannot trace the model"),
], ids=["used_twice", "shared_module", "add_into_residual", "untraceable"])
def test_unsafe_patterns_warn_and_stay_plain(device, model, fused, plain, needle):
    needle = needle.replace("the model", model.__name__)
    converted, warned = check_conversion(model(), torch.randn(2, 3, 4, 4), device, fused, plain,
                                         expect_warnings=1)
    assert needle in warned[0], warned
    if model is Untraceable:
        assert "bn" in warned[0].split("batch norms")[1]


def test_memory_saving_and_residual_fallback(device):
    """memory_saving=True reaches the fused modules; a residual the kernels cannot take (here a
    broadcast one) is added the ordinary way with the same result."""
    converted, _ = convert(resnet(18, 4).to(device), memory_saving=True)
    assert all(m.memory_saving for m in converted.modules() if isinstance(m, ACT_TYPES))
    bn = fusedbn.FusedBatchNormAct2d(3).to(device)
    ref = nn.BatchNorm2d(3).to(device)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4, device=device)
    r = torch.randn(1, 3, 1, 4, device=device)
    torch.testing.assert_close(bn(x, r), F.relu(ref(x) + r))
