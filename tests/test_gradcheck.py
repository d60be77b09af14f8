"""float64 torch.autograd.gradcheck of fusedbn's backward (finite differences against the analytic
gradients), through the modules and through fusedbn.functional.batch_norm; first-order gradients
with create_graph=True; second derivatives (gradgradcheck) and a WGAN-GP-style gradient penalty
checked against torch.nn."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import fusedbn
from bn_testing import FUSED_BY_RANK, in_layout, random_values, randomize_

SHAPES = {"1d_NC": (5, 3), "1d_NCL": (3, 2, 3), "2d": (2, 3, 2, 3), "3d": (2, 2, 2, 2, 2)}


def leaves(shape, device, layout="contiguous"):
    x = in_layout(random_values(shape), torch.float64, layout, device).requires_grad_(True)
    C = shape[1]
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("check", [gradcheck, gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_gradcheck_module(device, check, shape, training, affine):
    """First derivatives, and second ones through the analytic backward-of-backward
    (fusedbn/double_backward.py)."""
    shape = SHAPES[shape]
    module = FUSED_BY_RANK[len(shape)](shape[1], affine=affine, dtype=torch.float64,
                                       device=device)
    randomize_(module)
    module.train(training)
    x, w, b = leaves(shape, device)
    if affine:
        def fn(x, w, b):
            return functional_call(module, {"weight": w, "bias": b}, (x,))
        inputs = (x, w, b)
    else:
        fn, inputs = module, (x,)
    assert check(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["w_b", "w_only", "b_only", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_channels"])
def test_gradcheck_functional(device, training, which, layout):
    shape = (3, 2, 2, 3)
    x, w, b = leaves(shape, device, layout)
    w = w if which in ("w_b", "w_only") else None
    b = b if which in ("w_b", "b_only") else None
    rm = 0.5 * torch.randn(2, dtype=torch.float64, device=device)
    rv = 0.5 + torch.rand(2, dtype=torch.float64, device=device)
    params = [t for t in (w, b) if t is not None]

    def fn(x, *params):
        it = iter(params)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        # fresh statistics every call: the perturbed evaluations must not see each other's updates
        return fusedbn.functional.batch_norm(x, rm.clone(), rv.clone(), ww, bb, training, 0.1,
                                             1e-3)
    assert gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_without_running_stats(device):
    x, w, b = leaves((4, 3, 3), device)

    def fn(x, w, b):
        return fusedbn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def module_pair(device, training):
    """A float64 FusedBatchNorm2d(3) with random state and an nn.BatchNorm2d copy of it."""
    m = FUSED_BY_RANK[4](3, dtype=torch.float64, device=device)
    randomize_(m)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64, device=device)
    ref.load_state_dict(m.state_dict())
    return m.train(training), ref.train(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_graph_first_order(device, training):
    """torch.autograd.grad(..., create_graph=True) must give the same first-order gradients."""
    shape = (4, 3, 3, 3)
    m, ref = module_pair(device, training)
    x = random_values(shape).to(device).requires_grad_(True)
    dy = random_values(shape).to(device)
    g = torch.autograd.grad(m(x), [x, m.weight, m.bias], dy, create_graph=True)
    g_ref = torch.autograd.grad(ref(x), [x, ref.weight, ref.bias], dy)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_functional_bias_only(device, layout, training):
    """weight=None with a bias: dL/dw is absent, the other second derivatives still exact."""
    x, _, b = leaves((3, 2, 3, 2), device, layout)
    rm = torch.randn(2, dtype=torch.float64, device=device)
    rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5

    def fn(x, b):
        return fusedbn.functional.batch_norm(x, None if training else rm, None if training else rv,
                                             None, b, training=training)
    assert gradgradcheck(fn, (x, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(device, training):
    """WGAN-GP style: the gradient of ||d out / d x||^2 with respect to the parameters and x."""
    shape = (4, 3, 3, 3)
    m, ref = module_pair(device, training)
    x0 = random_values(shape).to(device)
    dy = random_values(shape).to(device)
    grads = []
    for mod in (m, ref):
        x = x0.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((mod(x) * dy).sum(), x, create_graph=True)
        penalty = gx.pow(2).sum()
        # dx does not depend on the bias: its gradient is absent (zeros) for both.
        grads.append(torch.autograd.grad(penalty, [x, mod.weight, mod.bias],
                                         materialize_grads=True))
    # In eval mode dx = w * invstd * dy does not depend on x, so only the weight term is non-zero.
    assert grads[0][1].abs().max() > 0
    assert (grads[0][0].abs().max() > 0) == training
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
