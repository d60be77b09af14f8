"""forward_train_update: forward_train, the counter's increment and update_running_stats in one op
(the eager path's one dispatch per training step, csrc/eager.cpp).

Its CPU kernel (csrc/cpu/bn_forward.cpp) and its composite (csrc/composite.cpp, which every other
device runs: CUDA, Meta, the emulated CUDA op library) must give exactly what the three ops give
in turn -- the same output and statistics, the same running statistics bit for bit, the counter
advanced once -- and refuse a bad argument before anything is written.
"""
import pytest
import torch

import fusedbn  # noqa: F401  (registers the ops)
from emu_testing import emu_ops, require_emu

OPS = torch.ops.fusedbn
COMPOSITE = torch._C.DispatchKey.CompositeExplicitAutograd

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _case(dtype, channels_last, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, C, 5, 7, generator=g) * 3 + 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g)
    rm = torch.randn(C, generator=g)
    rv = torch.rand(C, generator=g) + 0.5
    return x, w, b, rm, rv


def _separate(ops, x, w, b, rm, rv, counter, momentum, eps=1e-5):
    """The three ops in turn, as the eager path called them before forward_train_update."""
    out = ops.forward_train(x, w, b, eps)
    if counter is not None:
        counter.add_(1)
    batches = None if momentum is not None else counter
    ops.update_running_stats(rm, rv, out[1], out[3], x.numel() // x.shape[1], momentum, batches)
    return out


def _fused(call, x, w, b, rm, rv, counter, momentum, eps=1e-5):
    return call(x, w, b, rm, rv, counter, momentum, eps)


def _assert_same(got, want):
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride()
        assert torch.equal(g, e)


def _run_both(ops, call, dtype, channels_last, momentum, with_counter):
    x, w, b, rm, rv = _case(dtype, channels_last)
    rm2, rv2 = rm.clone(), rv.clone()
    c1 = torch.tensor(3) if with_counter else None
    c2 = torch.tensor(3) if with_counter else None
    want = _separate(ops, x, w, b, rm, rv, c1, momentum)
    got = _fused(call, x, w, b, rm2, rv2, c2, momentum)
    _assert_same(got, want)
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)
    if with_counter:
        assert int(c2) == int(c1) == 4


CASES = [(m, c) for m in (0.1, None) for c in (True, False) if m is not None or c]


@pytest.mark.parametrize("momentum,with_counter", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_matches_the_three_ops(dtype, channels_last, momentum, with_counter):
    _run_both(OPS, OPS.forward_train_update, dtype, channels_last, momentum, with_counter)


@pytest.mark.parametrize("momentum,with_counter", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_composite_matches_the_three_ops(dtype, momentum, with_counter):
    """The composite kernel, called on CPU tensors (where the CPU kernel would otherwise run)."""
    def composite(*args):
        return OPS.forward_train_update.default._op_dk(COMPOSITE, *args)
    _run_both(OPS, composite, dtype, False, momentum, with_counter)


@pytest.mark.parametrize("momentum,with_counter", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_emulated_cuda_composite_matches_the_three_ops(channels_last, momentum, with_counter):
    """The path of a CUDA input: the composite over the CUDA kernels (emulated here)."""
    require_emu()
    ops = emu_ops()
    _run_both(ops, ops.forward_train_update, torch.float32, channels_last, momentum, with_counter)


def test_meta_shapes():
    x = torch.empty(4, 6, 5, 7, device="meta", dtype=torch.bfloat16)
    w = torch.empty(6, device="meta")
    rm, rv = torch.empty(6, device="meta"), torch.empty(6, device="meta")
    counter = torch.zeros((), dtype=torch.long, device="meta")
    y, mean, invstd, var = OPS.forward_train_update(x, w, w, rm, rv, counter, None, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device.type == "meta"
    assert mean.shape == invstd.shape == var.shape == (6,) and mean.dtype == torch.float32


def test_counter_version_advances():
    """As add_(1) does: autograd's version counter of num_batches_tracked moves with its value."""
    x, w, b, rm, rv = _case(torch.float32, False)
    counter = torch.tensor(0)
    v0 = counter._version
    OPS.forward_train_update(x, w, b, rm, rv, counter, 0.1, 1e-5)
    assert int(counter) == 1 and counter._version == v0 + 1


@pytest.mark.parametrize("counter_dtype", [torch.int32, torch.float32, torch.float64], ids=str)
def test_counter_of_another_dtype(counter_dtype):
    """A state_dict may hold num_batches_tracked in another dtype: advanced and read in it."""
    x, w, b, rm, rv = _case(torch.float32, False)
    rm2, rv2 = rm.clone(), rv.clone()
    c1 = torch.tensor(2, dtype=counter_dtype)
    c2 = c1.clone()
    _separate(OPS, x, w, b, rm, rv, c1, None)
    OPS.forward_train_update(x, w, b, rm2, rv2, c2, None, 1e-5)
    assert c2.dtype == counter_dtype and float(c2) == float(c1) == 3
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


def _snapshot(*ts):
    return [t.clone() for t in ts]


REJECTED = {
    "running_var_shape": (lambda a: a.update(rv=torch.ones(7)), RuntimeError,
                          r"running_var must have shape \(6,\)"),
    "running_mean_integer": (lambda a: a.update(rm=torch.zeros(6, dtype=torch.long)), TypeError,
                             r"running_mean must be a floating-point tensor"),
    "no_counter_cumulative": (lambda a: a.update(counter=None), RuntimeError,
                              r"num_batches_tracked must be given when momentum is None"),
    "counter_two_values": (lambda a: a.update(counter=torch.zeros(2, dtype=torch.long)),
                           RuntimeError, r"num_batches_tracked must be a one-element tensor"),
    "integer_input": (lambda a: a.update(x=torch.ones(4, 6, 5, 7, dtype=torch.long)), TypeError,
                      r"input must be float32"),
    "one_value_per_channel": (lambda a: a.update(x=torch.randn(1, 6)), RuntimeError,
                              r"count must be 0 \(nothing to update\) or at least 2"),
}


@pytest.mark.parametrize("kernel", ["cpu", "composite"])
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected_leaves_no_trace(case, kernel):
    x, w, b, rm, rv = _case(torch.float32, False)
    args = dict(x=x, rm=rm, rv=rv, counter=torch.tensor(3))
    change, exc, pattern = REJECTED[case]
    change(args)
    kept = [t for t in (args["rm"], args["rv"], args["counter"]) if t is not None]
    before = _snapshot(*kept)
    call = OPS.forward_train_update if kernel == "cpu" else (
        lambda *a: OPS.forward_train_update.default._op_dk(COMPOSITE, *a))
    with pytest.raises(exc, match=pattern):
        call(args["x"], w, b, args["rm"], args["rv"], args["counter"], None, 1e-5)
    for t, t0 in zip(kept, before):
        assert torch.equal(t, t0), "a rejected call changed an argument"


def test_inference_counter_outside_inference_mode_is_refused_untouched():
    """add_(1) refuses an inference tensor outside InferenceMode; so does the in-place increment,
    before the counter or the statistics change."""
    x, w, b, rm, rv = _case(torch.float32, False)
    with torch.inference_mode():
        counter = torch.tensor(3)
    before = _snapshot(rm, rv)
    with pytest.raises(RuntimeError, match=r"Inplace update to inference tensor"):
        OPS.forward_train_update(x, w, b, rm, rv, counter, 0.1, 1e-5)
    assert int(counter) == 3
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_opcheck():
    x, w, b, rm, rv = _case(torch.float32, True)
    torch.library.opcheck(OPS.forward_train_update.default,
                          (x, w, b, rm, rv, torch.tensor(3), None, 1e-5))
