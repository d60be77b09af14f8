"""The eager C++ path (fusedbn._C.batch_norm, csrc/eager.cpp) against the Python autograd.Function
that torch.compile traces, and the autograd behaviour a C++ node must keep: gradients of any subset
of the inputs, saved-tensor hooks, a rejected batch leaving the state untouched, and calls from
several Python threads (the path releases the GIL)."""
import copy
import threading

import pytest
import torch

import fusedbn
from fusedbn import ops


def _pair(device, momentum=0.1, dtype=torch.float64, C=3):
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum, device=device, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    return fusedbn.convert_batchnorm(copy.deepcopy(ref)), ref


def _state(m):
    return [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_matches_traced_path(device, monkeypatch, momentum, training):
    """The C++ path and the Python Function (forced by making the op believe it is being
    compiled) give the same outputs, gradients, running statistics and counter, bit for bit."""
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(ops, "_is_compiling", lambda: compiling)
        m, _ = _pair(device, momentum, dtype=torch.float32)
        m.train(training)
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
            y = m(x)
            y.backward(torch.randn_like(y))
        results.append([y.detach(), x.grad, m.weight.grad, m.bias.grad] + _state(m))
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


@pytest.mark.parametrize("wrt", ["x", "weight", "bias", "weight,bias", "x,bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_of_a_subset(device, wrt, training):
    """torch.autograd.grad(inputs=...) asks the node for some gradients only: the ones asked for
    equal nn's."""
    m, ref = _pair(device)
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    names = wrt.split(",")
    grads = []
    for mod in (m.train(training), ref.train(training)):
        leaves = {"x": x, "weight": mod.weight, "bias": mod.bias}
        grads.append(torch.autograd.grad(mod(x), [leaves[n] for n in names], dy))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("given", ["weight", "bias"])
def test_only_weight_or_only_bias(device, given):
    """The node counts its tensor arguments (weight or bias absent shifts them): each gradient
    still lands on its own input."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, device=device, dtype=torch.float64).add_(0.5).requires_grad_()
    dy = torch.randn_like(x)
    kw = {given: p}
    outs = [torch.autograd.grad(f(x, None, None, training=True, **kw), [x, p], dy)
            for f in (fusedbn.functional.batch_norm, torch.nn.functional.batch_norm)]
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_saved_tensors_hooks(device):
    """The node saves through autograd's SavedVariable: pack/unpack hooks (activation offloading,
    checkpointing) see the input and their unpacked tensors are what backward uses."""
    m, ref = _pair(device)
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t.clone()  # backward must use the unpacked copy, equal in value

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert any(t is x or (t.shape == x.shape and torch.equal(t, x)) for t in packed)
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
    theirs = torch.autograd.grad(ref(x), [x, ref.weight, ref.bias], dy)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_rejected_batch_leaves_state_untouched(device, momentum):
    """An input the forward kernel refuses (integers): TypeError, and neither the running
    statistics nor num_batches_tracked move (the counter advances only after the checks)."""
    m, _ = _pair(device, momentum, dtype=torch.float32)
    m.train()
    before = _state(m)
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or bfloat16"):
        m(torch.ones(4, 3, 5, 5, device=device, dtype=torch.int64))
    for a, b in zip(_state(m), before):
        assert torch.equal(a, b)


def test_update_after_a_rejected_batch_uses_the_right_count(device):
    """momentum=None: after a rejected batch, the next batch averages with 1/2, not 1/3."""
    m, ref = _pair(device, None)
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64)
    m(x)
    ref(x)
    with pytest.raises(TypeError, match="input must be float32"):
        m(x.long())
    x2 = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64) * 2 + 1
    m(x2)
    ref(x2)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_threads(device):
    """Training steps of separate modules in four Python threads at once (the C++ path runs
    without the GIL) give what each gives alone."""
    def make(seed):
        g = torch.Generator().manual_seed(seed)
        m, _ = _pair(device, dtype=torch.float32, C=8)
        xs = [torch.randn(8, 8, 9, 9, generator=g).to(device) for _ in range(5)]
        return m, xs

    def step(m, xs):
        out = []
        for x in xs:
            x = x.clone().requires_grad_()
            y = m(x)
            y.backward(torch.ones_like(y))
            out.append((y.detach(), x.grad))
        return out + [tuple(_state(m))]

    expected = [step(*make(s)) for s in range(4)]
    work = [make(s) for s in range(4)]
    got = [None] * 4

    def run(i):
        got[i] = step(*work[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, r in zip(expected, got):
        for a, b in zip(e, r):
            for ta, tb in zip(a, b):
                assert torch.equal(ta, tb)


def test_no_grad_records_nothing(device):
    """Under no_grad (and for inputs that need no gradient) no node is recorded."""
    m, _ = _pair(device)
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert m(x).grad_fn is None
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    assert m(x.detach()).grad_fn is None
    assert m(x).grad_fn is not None


def test_op_level_entry_rejects_half_the_running_stats(device):
    """fusedbn.ops.batch_norm skips the functional's checks: running_mean without running_var is
    still a ValueError naming both, never a crash."""
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(ValueError, match="running_mean and running_var must both be tensors"):
        ops.batch_norm(x, torch.zeros(3, device=device), None, None, None, True, 0.1, 1e-5)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_traced_path_running_stats_check(device, name):
    """The check the Python paths use (torch.compile, the act modules, sync): Python tests, the C++
    wording (TypeError for the dtype, RuntimeError for the shape)."""
    x = torch.randn(4, 3, 5, device=device)
    kw = {"running_mean": torch.zeros(3, device=device),
          "running_var": torch.ones(3, device=device)}
    ops._check_running_stats(x, **kw)  # fine: no error
    kw[name] = torch.zeros(3, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^fusedbn\.batch_norm: %s must be float32 \(the "
                                        r"input's dtype\), got float64" % name):
        ops._check_running_stats(x, **kw)
    kw[name] = torch.zeros(4, device=device)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.batch_norm: %s must have shape \(3,\) "
                                           r"to match the 3 channels of input" % name):
        ops._check_running_stats(x, **kw)
