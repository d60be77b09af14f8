"""Real training runs: a small CNN and an MLP with batch norm trained on sklearn's bundled digits
(1797 8x8 images, no download). The original model and fusedbn.convert_batchnorm(deepcopy(model))
start from the same initialization and see the same mini-batches; losses, every gradient, the
running statistics and the final eval-mode outputs must agree step by step, and the model must
actually learn."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn

sklearn_datasets = pytest.importorskip(
    "sklearn.datasets",
    reason="scikit-learn provides the digits data set (pip install scikit-learn)")

STEPS = 30
BATCH = 64
N_TRAIN = 1500


def digits(device):
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(d.target, dtype=torch.long, device=device)
    return x, y


# Two things would make a step-by-step comparison of float32 runs ill-posed, and the models avoid
# them (they are irrelevant to what is tested, batch norm's forward, backward and statistics):
# * a parameter whose gradient is zero in exact arithmetic (a bias feeding a batch norm, or a batch
#   norm's bias whose output reaches the next batch norm through linear layers only) has a float32
#   gradient of pure rounding noise, and noise does not compare. So layers feeding a batch norm have
#   no bias (the usual way to write them), and a Tanh sits between the conv batch norm and the
#   Linear -> BatchNorm1d head.
# * max pooling routes the gradient to the argmax of each window; a near tie flips on a 1e-7
#   difference and moves one gradient element by its whole size (measured: a 1e-3 relative jump in
#   one run of ten against a float64 batch norm). Average pooling is smooth.
def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32, momentum=None), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))


def mlp():
    return nn.Sequential(
        nn.Linear(64, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64, eps=1e-3), nn.ReLU(),
        nn.Linear(64, 10))


def tolerance(step):
    """Relative tolerance at a step. One step agrees to ~1e-7 (float32 rounding in the batch-norm
    reductions); SGD with momentum carries the differences forward. Measured with a float64 batch
    norm in place of torch's float32 one (ten initializations, these models and this schedule):
    max |difference| / max |value| of any gradient stays below 2e-6 * (1 + step / 5), parameters
    and running statistics below 1e-6. 1e-5 * (1 + step / 5), i.e. 1e-5 growing to 7e-5 at step 30,
    leaves a factor of 5, while any wrong term in a gradient or a running statistic shows up at
    1e-3 or more in the first step."""
    return 1e-5 * (1 + step / 5)


def assert_tensors_agree(what, ours, theirs, step):
    tol = tolerance(step)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    scale = theirs.abs().max().clamp_min(1e-12)
    err = (ours - theirs).abs().max() / scale
    assert err <= tol, "step %d, %s: max|ours - torch| / max|torch| = %.3g > %.3g" % (
        step, what, err, tol)


@pytest.mark.parametrize("model_name", ["cnn", "cnn_channels_last", "mlp"])
def test_training_matches_torch(device, model_name):
    torch.manual_seed(0)
    x_all, y_all = digits(device)
    if model_name.startswith("cnn"):
        x_all = x_all.view(-1, 1, 8, 8)
        original = cnn().to(device)
    else:
        original = mlp().to(device)
    if model_name.endswith("channels_last"):
        original = original.to(memory_format=torch.channels_last)
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    fused = fusedbn.convert_batchnorm(copy.deepcopy(original))
    n_fused = sum(isinstance(m, (fusedbn.FusedBatchNorm1d, fusedbn.FusedBatchNorm2d))
                  for m in fused.modules())
    assert n_fused == 3 if model_name.startswith("cnn") else n_fused == 2
    opt_a = torch.optim.SGD(original.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(1)).to(device)

    losses = []
    for step in range(STEPS):
        idx = order[(step * BATCH) % (N_TRAIN - BATCH):][:BATCH]
        xb, yb = x_all[idx], y_all[idx]
        if model_name.endswith("channels_last"):
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss_a = F.cross_entropy(original(xb), yb)
        loss_b = F.cross_entropy(fused(xb), yb)
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss_a.backward()
        loss_b.backward()
        assert_tensors_agree("loss", loss_b.detach(), loss_a.detach(), step)
        for (name, p), q in zip(original.named_parameters(), fused.parameters()):
            assert_tensors_agree("grad of " + name, q.grad, p.grad, step)
        opt_a.step()
        opt_b.step()
        for (name, p), q in zip(original.named_parameters(), fused.parameters()):
            assert_tensors_agree(name, q.detach(), p.detach(), step)
        for (name, buf), buf_b in zip(original.named_buffers(), fused.buffers()):
            if buf.is_floating_point():
                assert_tensors_agree(name, buf_b, buf, step)
            else:
                assert torch.equal(buf_b, buf), name
        losses.append(loss_a.item())

    # the run is meaningful: the model learned
    assert sum(losses[-5:]) / 5 < 0.35 * losses[0], losses
    original.eval()
    fused.eval()
    with torch.no_grad():
        x_test, y_test = x_all[N_TRAIN:], y_all[N_TRAIN:]
        out_a, out_b = original(x_test), fused(x_test)
    assert_tensors_agree("eval outputs", out_b, out_a, STEPS)
    acc_a = (out_a.argmax(1) == y_test).float().mean().item()
    acc_b = (out_b.argmax(1) == y_test).float().mean().item()
    assert acc_a > 0.5, acc_a  # chance is 0.1 (30 steps; the running statistics lag the weights)
    assert abs(acc_a - acc_b) <= 2 / len(y_test)  # at most a borderline sample or two differ
