"""torch.compile(fullgraph=True) over models built from every fusedbn module: no graph break, no
recompilation from one training step to the next, and outputs, gradients and running statistics
equal to eager execution, in train and eval, with momentum a float or None (the cumulative average,
where torch's own module breaks the graph on float(num_batches_tracked)).

Most cases use the aot_eager backend (it traces the fake kernels, functionalizes the running-stat
mutation and builds the joint forward/backward graph, which is what a graph break or a wrong fake
kernel would trip over) because inductor's C++ compile of every graph costs seconds here; one case
runs inductor end to end."""
import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import fusedbn


class AllModules(nn.Module):
    """BatchNorm3d on (N, C, D, H, W), BatchNorm2d on channels_last, BatchNorm1d on (N, C, L) and
    on (N, C) in one forward."""

    def __init__(self, momentum):
        super().__init__()
        self.bn3 = fusedbn.FusedBatchNorm3d(4, momentum=momentum)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = fusedbn.FusedBatchNorm2d(6, momentum=momentum)
        self.bn1l = fusedbn.FusedBatchNorm1d(6, momentum=momentum)
        self.fc = nn.Linear(6 * 50, 10, bias=False)
        self.bn1 = fusedbn.FusedBatchNorm1d(10, momentum=momentum, affine=False)

    def forward(self, x):
        n = x.shape[0]
        x = torch.relu(self.bn3(x))                      # (N, 4, 2, 5, 5)
        x = x.reshape(n * 2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        x = self.bn2(self.conv(x))                       # (2N, 6, 5, 5) channels_last
        x = self.bn1l(x.reshape(n, 6, -1))               # (N, 6, 50)
        return self.bn1(self.fc(x.reshape(n, -1)))       # (N, 10)


def assert_state_equal(a, b):
    for (name, t), (_, r) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-6, msg=name)


def run_steps(model, compiled, steps, make_input):
    """Trains `compiled` (a torch.compile of `model`) and an eager copy side by side. The models
    have no bias right before a batch norm: its exact gradient is zero, so any computed value is
    rounding noise that no relative comparison can judge."""
    eager = copy.deepcopy(model)
    for step in range(steps):
        x = make_input(step)
        y, y_ref = compiled(x), eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        # A random linear loss: y.square().sum() would make the last batch norm's input gradient
        # pure cancellation noise (dy = 2 y is in the span the backward projects out).
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        for (name, p), (_, p_ref) in zip(model.named_parameters(), eager.named_parameters()):
            scale = p_ref.grad.abs().max().item() or 1.0
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert_state_equal(model, eager)
    return eager


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_fullgraph_train_then_eval(device, momentum):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = AllModules(momentum).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        # The first call compiles, every later training step must reuse that graph.
        eager = run_steps(model, compiled, 4,
                          lambda s: torch.randn(3, 4, 2, 5, 5, device=device) + s)
    assert int(model.bn2.num_batches_tracked) == 4
    model.eval()
    eager.eval()
    x = torch.randn(3, 4, 2, 5, 5, device=device)
    with torch._dynamo.config.patch(error_on_recompile=False):  # train -> eval is one recompile
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x + 1), eager(x + 1), rtol=1e-5, atol=1e-5)


def test_fullgraph_track_running_stats_false(device):
    """Batch statistics in eval too, no buffers to update."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False),
                          fusedbn.FusedBatchNorm2d(5, track_running_stats=False)).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    run_steps(model, compiled, 2, lambda s: torch.randn(2, 3, 6, 6, device=device))
    model.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), copy.deepcopy(model)(x), rtol=1e-5, atol=1e-5)


def test_fullgraph_inductor_end_to_end(device):
    """The real compiler: a conv/BN/ReLU training step with momentum=None under inductor."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), fusedbn.FusedBatchNorm2d(8, momentum=None),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False),
                          fusedbn.FusedBatchNorm2d(4)).to(device)
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steps(model, compiled, 3, lambda s: torch.randn(4, 3, 9, 9, device=device))


def test_functional_under_compile(device):
    torch.manual_seed(0)
    torch._dynamo.reset()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    w = torch.rand(3, device=device) + 0.5
    b = torch.randn(3, device=device)

    def fn(x, rm, rv):
        return fusedbn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 5, device=device)
        torch.testing.assert_close(compiled(x, rm, rv),
                                   torch.nn.functional.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.3),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm, rm_ref)
        torch.testing.assert_close(rv, rv_ref)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_fullgraph_act_modules(device, momentum):
    """The fused BN + add + ReLU module traces whole as well (its device check and counter stay
    traceable Python), and trains like its eager copy."""
    torch.manual_seed(0)
    torch._dynamo.reset()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = fusedbn.FusedBatchNormAct2d(4, momentum=momentum, activation="relu")

        def forward(self, x):
            return self.bn(self.conv(x), x)

    model = Block().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steps(model, compiled, 3, lambda s: torch.randn(2, 4, 6, 6, device=device))
    assert int(model.bn.num_batches_tracked) == 3
