"""A rejected batch leaves no trace, on every path: the input or an argument is refused with a
clear exception, and the running statistics and num_batches_tracked are exactly what they were.

Paths (all reachable on the CPU):
  eager      the C++ entry (csrc/eager.cpp) the modules and fusedbn.functional call;
  traced     the Python autograd.Function torch.compile traces (entered directly by making the op
             believe it is being compiled), plus one real torch.compile (aot_eager) case;
  act        FusedBatchNormAct2d (relu, identity): the Python Function of fusedbn/act_ops.py;
  sync       FusedSyncBatchNorm: its one-process path (the eager path underneath) and the
             synchronized Function itself on a gloo group of one rank;
  functional fusedbn.functional.batch_norm with running statistics.

"Another device" uses the meta device (this machine has no GPU): a meta tensor among CPU ones
makes the dispatcher pick the meta (fake) kernels, so these cases also check that fusedbn refuses
the mix before any kernel -- torch itself refuses it too ("is not on the expected device").
"""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fusedbn
from fusedbn import act_ops, ops
from fusedbn.sync import SyncBatchNormFunction

C = 3


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype) * 2 + 1


def _to_meta(module, name):
    t = getattr(module, name)
    if isinstance(t, torch.nn.Parameter):
        setattr(module, name, torch.nn.Parameter(t.detach().to("meta")))
    else:
        module.register_buffer(name, t.to("meta"))


# name -> (change to the module, the input, exception type(s), message pattern)
# The channel-count case accepts ValueError or RuntimeError: the modules' wording of a channel
# mismatch is being reworded elsewhere; what matters here is that it is refused without a trace.
CASES = {
    "integer_input": (None, lambda: torch.ones(4, C, 5, 5, dtype=torch.int64), TypeError,
                      r"input must be float32, float64, float16 or bfloat16"),
    "wrong_channels": (None, lambda: _x(4, C + 1, 5, 5), (ValueError, RuntimeError), r"channel"),
    "wrong_dims": (None, lambda: _x(4, C, 5), ValueError, r"expected 4D input"),
    "running_mean_float64": (
        lambda m: m.register_buffer("running_mean", m.running_mean.double()),
        lambda: _x(4, C, 5, 5), TypeError, r"running_mean must be float32"),
    "running_var_shape": (
        lambda m: m.register_buffer("running_var", torch.ones(C + 1)),
        lambda: _x(4, C, 5, 5), RuntimeError, r"running_var must have shape \(3,\)"),
    "weight_meta": (lambda m: _to_meta(m, "weight"), lambda: _x(4, C, 5, 5), RuntimeError,
                    r"weight must be on the input's device cpu, got meta"),
    "bias_meta": (lambda m: _to_meta(m, "bias"), lambda: _x(4, C, 5, 5), RuntimeError,
                  r"bias must be on the input's device cpu, got meta"),
    "running_mean_meta": (lambda m: _to_meta(m, "running_mean"), lambda: _x(4, C, 5, 5),
                          RuntimeError, r"running_mean must be on the input's device cpu, "
                                        r"got meta"),
}


def _module(kind, momentum):
    torch.manual_seed(0)
    cls = {"bn": fusedbn.FusedBatchNorm2d, "act_relu": fusedbn.FusedBatchNormAct2d,
           "act_identity": fusedbn.FusedBatchNormAct2d, "sync": fusedbn.FusedSyncBatchNorm}[kind]
    kw = {}
    if kind == "act_relu":
        kw["activation"] = "relu"
    if kind == "act_identity":
        kw["activation"] = "identity"
    m = cls(C, momentum=momentum, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(4)
    if kind == "sync":
        m._check_input_dim = lambda input: (  # nn.SyncBatchNorm takes any rank; test 4-D
            None if input.dim() == 4 else (_ for _ in ()).throw(
                ValueError("expected 4D input (got %dD input)" % input.dim())))
    return m


def _snapshot(m):
    """Every real (non-meta) tensor of the module's state, cloned."""
    return {k: v.detach().clone() for k, v in m.state_dict().items() if v.device.type != "meta"}


def _assert_untouched(m, before):
    after = _snapshot(m)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), "%s changed in a rejected call" % k


@pytest.fixture(params=["eager", "traced"])
def path(request, monkeypatch):
    if request.param == "traced":
        monkeypatch.setattr(ops, "_is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("kind", ["bn", "act_relu", "act_identity", "sync"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
def test_module_rejects_without_trace(path, kind, case, momentum, requires_grad):
    """The module refuses the batch and its state is exactly what it was; the next good batch
    then gives the results of a module that never saw the bad one (num_batches_tracked 5, and
    for momentum=None the average with factor 1/5)."""
    change, make_input, exc, pattern = CASES[case]
    m = _module(kind, momentum)
    twin = _module(kind, momentum)  # never sees the bad batch
    if change is not None:
        change(m)
    before = _snapshot(m)
    x = make_input()
    if requires_grad and x.is_floating_point():
        x.requires_grad_()
    with pytest.raises(exc, match=pattern):
        m(x)
    _assert_untouched(m, before)
    if change is None:  # the module is intact: it trains on as if the bad batch never came
        good = _x(4, C, 5, 5)
        m(good)
        twin(good)
        assert int(m.num_batches_tracked) == int(twin.num_batches_tracked) == 5
        assert torch.equal(m.running_mean, twin.running_mean)
        assert torch.equal(m.running_var, twin.running_var)


@pytest.mark.parametrize("kind", ["bn", "act_relu", "sync"])
def test_meta_counter_with_cumulative_average(path, kind):
    """momentum=None reads num_batches_tracked on the input's device: a counter left on another
    device (meta here) is refused before the forward, and the running statistics stay put."""
    m = _module(kind, None)
    _to_meta(m, "num_batches_tracked")
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match=r"num_batches_tracked must be a one-element tensor on "
                                           r"the input's device cpu"):
        m(_x(4, C, 5, 5))
    _assert_untouched(m, before)


@pytest.mark.parametrize("kind", ["bn", "act_relu"])
def test_meta_counter_with_momentum(path, kind):
    """With a float momentum the counter is only counted (as torch does, on whatever device it
    is): a meta counter is advanced there, the statistics are updated as torch's are."""
    m = _module(kind, 0.1)
    twin = _module(kind, 0.1)
    _to_meta(m, "num_batches_tracked")
    x = _x(4, C, 5, 5)
    m(x)
    twin(x)
    assert torch.equal(m.running_mean, twin.running_mean)


def _stats():
    torch.manual_seed(1)
    return torch.randn(C), torch.rand(C) + 0.5


FUNCTIONAL_CASES = {
    "integer_input": (lambda: torch.ones(4, C, 5, dtype=torch.int64), {}, TypeError,
                      r"input must be float32"),
    "wrong_channels": (lambda: _x(4, C + 1, 5), {}, RuntimeError, r"running_mean must have "
                                                                  r"shape \(4,\)"),
    "wrong_dims": (lambda: _x(5), {}, RuntimeError, r"at least 2 dimensions"),
    "weight_channels": (lambda: _x(4, C, 5), {"weight": torch.ones(C + 1)}, RuntimeError,
                        r"weight must have shape \(3,\)"),
    "weight_meta": (lambda: _x(4, C, 5), {"weight": torch.ones(C, device="meta")}, RuntimeError,
                    r"weight must be on the input's device cpu, got meta"),
    "bias_float64": (lambda: _x(4, C, 5), {"bias": torch.ones(C, dtype=torch.float64)},
                     TypeError, r"bias must be float32"),
    "running_var_float64": (lambda: _x(4, C, 5), {"running_var": "float64"}, TypeError,
                            r"running_var must be float32"),
    "running_mean_meta": (lambda: _x(4, C, 5), {"running_mean": "meta"}, RuntimeError,
                          r"running_mean must be on the input's device cpu, got meta"),
    "one_value_per_channel": (lambda: _x(1, C), {}, ValueError,
                              r"Expected more than 1 value per channel when training"),
}


@pytest.mark.parametrize("case,training", [
    (c, t) for c in sorted(FUNCTIONAL_CASES) for t in (True, False)
    if t or c != "one_value_per_channel"])  # (eval mode normalizes one value per channel fine)
def test_functional_rejects_without_trace(path, case, training):
    """fusedbn.functional.batch_norm with running statistics: refused, statistics unchanged."""
    make_input, kw, exc, pattern = FUNCTIONAL_CASES[case]
    rm, rv = _stats()
    kw = dict(kw)
    for name in ("running_mean", "running_var"):
        spec = kw.pop(name, None)
        base = rm if name == "running_mean" else rv
        if spec == "float64":
            kw[name] = base.double()
        elif spec == "meta":
            kw[name] = base.to("meta")
        else:
            kw[name] = base
    passed = {k: kw[k] for k in ("running_mean", "running_var")}
    before = {k: v.clone() for k, v in passed.items() if v.device.type != "meta"}
    with pytest.raises(exc, match=pattern):
        fusedbn.functional.batch_norm(make_input(), kw.pop("running_mean"),
                                      kw.pop("running_var"), training=training, **kw)
    for k, v in before.items():
        assert torch.equal(passed[k], v), "%s changed in a rejected call" % k


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("entry", ["batch_norm", "batch_norm_act"])
def test_op_level_entry_one_value_per_channel(path, momentum, entry):
    """The op-level entries skip the functional's checks: an input of one value per channel,
    whose unbiased variance cannot update the running statistics, is refused before the forward
    and the counter."""
    rm, rv = _stats()
    counter = torch.tensor(4)
    state = [rm.clone(), rv.clone(), counter.clone()]
    x = _x(1, C)
    with pytest.raises(ValueError, match=r"needs more than 1 value per channel"):
        if entry == "batch_norm":
            ops.batch_norm(x, rm, rv, None, None, True, momentum, 1e-5, counter)
        else:
            act_ops.batch_norm_act(x, rm, rv, None, None, None, True, momentum, 1e-5, "relu",
                                   counter=counter)
    for a, b in zip([rm, rv, counter], state):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ["batch_norm", "batch_norm_act"])
def test_op_level_entry_counts_after_success(path, entry):
    """The counter moves by exactly one per accepted batch, on every entry."""
    rm, rv = _stats()
    counter = torch.tensor(0)
    x = _x(4, C, 5)
    for step in range(1, 3):
        if entry == "batch_norm":
            ops.batch_norm(x, rm, rv, None, None, True, None, 1e-5, counter)
        else:
            act_ops.batch_norm_act(x, rm, rv, None, None, None, True, None, 1e-5, "identity",
                                   counter=counter)
        assert int(counter) == step
    # cumulative average of the same batch twice: the batch statistics themselves
    dims = [0, 2]
    torch.testing.assert_close(rm, x.mean(dims))
    torch.testing.assert_close(rv, x.var(dims, unbiased=True))


@pytest.fixture
def group_of_one():
    """A one-rank gloo group in this process, destroyed afterwards."""
    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "init"),
                                rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


SYNC_CASES = {
    "integer_input": (lambda: torch.ones(4, C, 5, dtype=torch.int64), {}, TypeError),
    "wrong_channels": (lambda: _x(4, C + 1, 5), {}, ValueError),
    "running_mean_float64": (lambda: _x(4, C, 5), {"rm": torch.float64}, TypeError),
    "running_var_meta": (lambda: _x(4, C, 5), {"rv": "meta"}, RuntimeError),
    "weight_meta": (lambda: _x(4, C, 5), {"w": "meta"}, RuntimeError),
    "counter_meta": (lambda: _x(4, C, 5), {"nbt": "meta"}, RuntimeError),
}


@pytest.mark.parametrize("case", sorted(SYNC_CASES))
def test_sync_function_rejects_without_trace(group_of_one, case):
    """The synchronized Function itself (the module skips it with one rank), momentum=None:
    refused on its rank, running statistics and counter unchanged."""
    make_input, spec, exc = SYNC_CASES[case]
    rm, rv = _stats()
    nbt = torch.tensor(4)
    w, b = torch.ones(C), torch.zeros(C)
    state = [rm.clone(), rv.clone(), nbt.clone()]
    if "rm" in spec:
        rm = rm.to(spec["rm"])
        state[0] = rm.clone()
    if spec.get("rv") == "meta":
        rv = rv.to("meta")
    if spec.get("w") == "meta":
        w = w.to("meta")
    if spec.get("nbt") == "meta":
        nbt = nbt.to("meta")
    with pytest.raises(exc):
        SyncBatchNormFunction.apply(make_input(), w, b, rm, rv, nbt, None, 1e-5, group_of_one, C)
    for a, s in zip([rm, rv, nbt], state):
        if a.device.type != "meta":
            assert torch.equal(a, s)


def test_compiled_integer_input_is_not_counted():
    """torch.compile (aot_eager: functionalized graph) of a module step: an integer input raises
    the kernel's TypeError and the counter and statistics are unchanged."""
    m = _module("bn", None)
    step = torch.compile(m, backend="aot_eager", fullgraph=True)
    step(_x(4, C, 5, 5))
    assert int(m.num_batches_tracked) == 5
    before = _snapshot(m)
    with pytest.raises(TypeError, match=r"input must be float32"):
        step(torch.ones(4, C, 5, 5, dtype=torch.int64))
    _assert_untouched(m, before)


# ---- a num_batches_tracked below 1 with momentum=None: a defined result on every device --------

@pytest.mark.parametrize("batches", [0, -3, 0.5], ids=["zero", "negative", "half"])
def test_update_with_count_below_one_counts_as_one(device, batches):
    """update_running_stats with momentum=None reads num_batches_tracked on the device (no host
    synchronization, so it cannot raise on CUDA): a count below 1 counts as 1 -- factor 1, the
    running statistics become the batch's mean and unbiased variance -- on the CPU and CUDA alike
    (instead of CUDA's former inf/NaN and the CPU's former raise)."""
    rm = torch.randn(C, device=device)
    rv = torch.rand(C, device=device) + 0.5
    mean = torch.randn(C, device=device)
    var = torch.rand(C, device=device)
    count = 10
    nbt = torch.tensor(batches, device=device,
                       dtype=torch.float64 if isinstance(batches, float) else torch.int64)
    torch.ops.fusedbn.update_running_stats(rm, rv, mean, var, count, None, nbt)
    torch.testing.assert_close(rm, mean, rtol=0, atol=0)
    torch.testing.assert_close(rv, var * count / (count - 1), rtol=1e-6, atol=0)


def test_module_with_negative_counter_takes_the_batch_statistics(device):
    """A module whose state_dict says num_batches_tracked = -1 (hand-edited): its next
    momentum=None step counts to 0 and, counting that as 1, takes the batch's statistics."""
    m = fusedbn.FusedBatchNorm2d(C, momentum=None, device=device)
    m.num_batches_tracked.fill_(-1)
    x = _x(4, C, 5, 5).to(device)
    m(x)
    assert int(m.num_batches_tracked) == 0
    torch.testing.assert_close(m.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(m.running_var, x.var((0, 2, 3), unbiased=True))
