"""fusedbn.convert_batchnorm / revert_batchnorm: which modules are replaced, and that everything the
rest of a training script holds on to (parameter and buffer objects, optimizer state, requires_grad,
train/eval mode, device, dtype, state_dict keys, options) survives."""
import copy

import pytest
import torch
import torch.nn as nn

import fusedbn

PLAIN_TO_FUSED = {nn.BatchNorm1d: fusedbn.FusedBatchNorm1d,
                  nn.BatchNorm2d: fusedbn.FusedBatchNorm2d,
                  nn.BatchNorm3d: fusedbn.FusedBatchNorm3d}
FUSED_TO_PLAIN = {v: k for k, v in PLAIN_TO_FUSED.items()}


class MyBatchNorm(nn.BatchNorm2d):
    """A user's subclass: fusedbn does not know what its forward does, so it must be left alone."""

    def forward(self, x):
        return super().forward(x) * 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=None, eps=1e-3))

    def forward(self, x):
        return self.inner(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.bns = nn.ModuleList([nn.BatchNorm2d(4, affine=False), MyBatchNorm(4)])
        self.heads = nn.ModuleDict({"a": nn.BatchNorm1d(4, track_running_stats=False),
                                    "b": nn.BatchNorm1d(4, bias=False)})
        self.seq3d = nn.Sequential(nn.BatchNorm3d(4))
        self.sync = nn.SyncBatchNorm(4)  # never run here: it needs a process group

    def forward(self, x):
        h = self.bns[1](self.bns[0](self.block(x)))
        h3 = self.seq3d(h.unsqueeze(2)).squeeze(2)
        v = h3.mean((2, 3))
        return self.heads["a"](v) + self.heads["b"](v)


def expected_type(module):
    return PLAIN_TO_FUSED.get(type(module), type(module))


def make_net(device, dtype=torch.float32):
    torch.manual_seed(0)
    net = Net().to(device=device, dtype=dtype)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_()
    return net


def snapshot(model):
    """name -> (type, the Parameter/buffer objects, requires_grad flags, training flag)."""
    return {name: (type(m), {n: t for n, t in list(m.named_parameters(recurse=False))
                             + list(m.named_buffers(recurse=False))},
                   {n: p.requires_grad for n, p in m.named_parameters(recurse=False)},
                   m.training)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_convert_nested_model(device, dtype):
    net = make_net(device, dtype)
    net.block.bn.weight.requires_grad_(False)
    net.heads["b"].eval()
    x = torch.randn(6, 3, 5, 5, device=device, dtype=dtype)
    reference = copy.deepcopy(net)
    before = snapshot(net)
    keys = list(net.state_dict())

    converted = fusedbn.convert_batchnorm(net)
    assert converted is net  # the root is not a batch norm: converted in place
    after = snapshot(converted)
    assert list(after) == list(before)  # same module names, same order
    for name, (t_before, tensors, grads, training) in before.items():
        t_after, tensors_after, grads_after, training_after = after[name]
        if name == "":
            continue
        module = converted.get_submodule(name)
        assert type(module) is expected_type(reference.get_submodule(name)), name
        assert tensors_after.keys() == tensors.keys(), name
        for n in tensors:
            assert tensors_after[n] is tensors[n], "%s.%s is a new object" % (name, n)
        assert grads_after == grads and training_after == training, name
    assert type(converted.sync) is nn.SyncBatchNorm
    assert type(converted.bns[1]) is MyBatchNorm
    assert list(converted.state_dict()) == keys
    for p in converted.parameters():
        assert p.dtype == dtype and p.device.type == device.type
    # options survive
    inner = converted.block.inner[1]
    assert inner.momentum is None and inner.eps == 1e-3
    assert converted.bns[0].weight is None and converted.bns[0].affine is False
    assert converted.heads["a"].running_mean is None
    assert converted.heads["b"].bias is None and converted.heads["b"].weight is not None
    # the converted model computes what the original computed
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(converted(x), reference(x), **tol)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, **tol)


def test_convert_root_batchnorm(device):
    for plain_cls, fused_cls in PLAIN_TO_FUSED.items():
        bn = plain_cls(3, momentum=0.3, device=device).eval()
        bn.weight.requires_grad_(False)
        params = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        out = fusedbn.convert_batchnorm(bn)
        assert type(out) is fused_cls
        assert all(a is b for a, b in zip((out.weight, out.bias, out.running_mean,
                                           out.running_var, out.num_batches_tracked), params))
        assert not out.training and not out.weight.requires_grad and out.momentum == 0.3
        back = fusedbn.revert_batchnorm(out)
        assert type(back) is plain_cls
        assert all(a is b for a, b in zip((back.weight, back.bias, back.running_mean,
                                           back.running_var, back.num_batches_tracked), params))
        assert not back.training and back.momentum == 0.3


def test_convert_leaves_unknown_subclasses_alone():
    sync = nn.SyncBatchNorm(3)
    assert fusedbn.convert_batchnorm(sync) is sync and type(sync) is nn.SyncBatchNorm
    mine = MyBatchNorm(3)
    assert fusedbn.convert_batchnorm(mine) is mine and type(mine) is MyBatchNorm
    other = nn.Sequential(nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm2d(3))
    before = [type(m) for m in other]
    assert [type(m) for m in fusedbn.convert_batchnorm(other)] == before


def test_convert_is_idempotent_and_revert_restores(device):
    net = make_net(device)
    types = {name: type(m) for name, m in net.named_modules()}
    fused_types = {name: expected_type(m) for name, m in net.named_modules()}
    fused = fusedbn.convert_batchnorm(net)
    assert {n: type(m) for n, m in fused.named_modules()} == fused_types
    again = fusedbn.convert_batchnorm(fused)
    assert {n: type(m) for n, m in again.named_modules()} == fused_types
    params = {n: p for n, p in again.named_parameters()}
    reverted = fusedbn.revert_batchnorm(again)
    assert {n: type(m) for n, m in reverted.named_modules()} == types
    for n, p in reverted.named_parameters():
        assert p is params[n]
    assert not any(type(m) in FUSED_TO_PLAIN for m in reverted.modules())


def test_optimizer_state_survives_conversion(device):
    """An optimizer built (and stepped) before conversion keeps working on the same parameters:
    the converted model trains exactly like an unconverted copy."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(
        device)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(16, 5, device=device), torch.randint(0, 3, (16,), device=device))
            for _ in range(4)]

    def step(m, o, xb, yb):
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(xb), yb)
        loss.backward()
        o.step()
        return loss.item()

    step(model, opt, *data[0])
    step(twin, opt_twin, *data[0])
    model = fusedbn.convert_batchnorm(model)
    assert isinstance(model[1], fusedbn.FusedBatchNorm1d)
    assert model[1].weight in opt.state and "momentum_buffer" in opt.state[model[1].weight]
    for xb, yb in data[1:]:
        a, b = step(model, opt, xb, yb), step(twin, opt_twin, xb, yb)
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_revert_of_plain_model_is_a_no_op():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    types = [type(m) for m in net]
    assert fusedbn.revert_batchnorm(net) is net
    assert [type(m) for m in net] == types
