"""Numerics beyond the parity grid: accuracy on hard inputs (large mean, small spread, millions of
values per channel) measured against torch's own accuracy; empty batches; NaN/Inf propagation;
constant channels; float16 values whose squares overflow float16; determinism on the CPU."""
import pytest
import torch
import torch.nn as nn

import fusedbn
from bn_testing import (DTYPE_PAIRS, FUSED_BY_RANK, NN_BY_RANK, Trio, check_trio_step,
                        dtype_pair_id, in_layout, random_values)


# ---------------------------------------------------------------------------------------------
# Accuracy: mean 1e4, std 1e-2, millions of values per channel
# ---------------------------------------------------------------------------------------------
def ulp32(v):
    """The float32 spacing at |v|: the smallest difference two float32 results can have there."""
    v = torch.tensor(abs(float(v.detach() if torch.is_tensor(v) else v)), dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(float("inf"))) - v)


def hard_input(shape, layout, device):
    """float32 values 1e4 + 1e-2 * N(0, 1): the spread is ~10 float32 ulps of the mean, so a
    one-pass E[x^2] - E[x]^2 is hopeless and even the mean must be accumulated carefully."""
    vals = 1e4 + 1e-2 * torch.randn(shape, dtype=torch.float64)
    return in_layout(vals, torch.float32, layout, device)


def errors(x, rank):
    """max errors against the float64 reference (computed from the float32 input upcast) of the
    output, the batch mean and the unbiased batch variance (relative), for fusedbn and torch.
    momentum=1.0 makes the running statistics equal to the batch statistics."""
    C = x.shape[1]
    ref = NN_BY_RANK[rank](C, momentum=1.0, dtype=torch.float64, device=x.device)
    y_ref = ref(x.double())
    out = {}
    for name, cls in (("ours", FUSED_BY_RANK[rank]), ("torch", NN_BY_RANK[rank])):
        m = cls(C, momentum=1.0, device=x.device)
        with torch.no_grad():
            y = m(x)
        assert torch.isfinite(y).all() or name == "torch"
        out[name] = {
            "output": (y.double() - y_ref).abs().max().item(),
            "mean": (m.running_mean.double() - ref.running_mean).abs().max().item(),
            "var (relative)": ((m.running_var.double() - ref.running_var).abs()
                               / ref.running_var).max().item(),
        }
    slack = {  # one float32 ulp of each quantity: see the test's docstring
        "output": ulp32(y_ref.abs().max()),
        "mean": ulp32(ref.running_mean.abs().max()),
        "var (relative)": 2 * torch.finfo(torch.float32).eps,
    }
    return out, slack


LARGE = [((4, 2, 512, 512), "contiguous"), ((4, 2, 512, 512), "channels_last"),
         ((1, 1, 2048, 2048), "contiguous"), ((1, 1, 2048, 2048), "channels_last")]


@pytest.mark.slow
@pytest.mark.parametrize("shape,layout", LARGE, ids=["%s-%s" % ("x".join(map(str, s)), l)
                                                     for s, l in LARGE])
def test_accuracy_large_mean_not_worse_than_torch(device, shape, layout):
    """Our error against the float64 reference is at most torch's error on the same input and
    layout, plus one float32 ulp of the quantity: both results are float32 numbers, and when both
    are within an ulp of the exact value which of them rounds closer is a coin toss, not a
    difference in accuracy."""
    x = hard_input(shape, layout, device)
    err, slack = errors(x, 4)
    for q in slack:
        assert err["ours"][q] <= err["torch"][q] + slack[q], (
            "%s: ours %.3g, torch %.3g (+ slack %.3g)" % (q, err["ours"][q], err["torch"][q],
                                                          slack[q]))


@pytest.mark.slow
def test_accuracy_channels_last_not_worse_than_torch_contiguous(device):
    """torch's channels-last CPU kernel sums in plain float32 and loses the variance entirely on
    this input (relative error ~1e7); its contiguous kernel shows what float32 can do on the same
    values. fusedbn promises one accuracy for every layout: its channels-last result must be as
    good as torch's contiguous one (plus one ulp, as above)."""
    shape = (4, 2, 512, 512)
    x = hard_input(shape, "contiguous", device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    err_c, slack = errors(x, 4)
    err_cl, _ = errors(x_cl, 4)
    for q in slack:
        assert err_cl["ours"][q] <= err_c["torch"][q] + slack[q], (
            "%s: ours (channels_last) %.3g, torch (contiguous) %.3g (+ slack %.3g)"
            % (q, err_cl["ours"][q], err_c["torch"][q], slack[q]))


def test_raw_statistics_on_hard_input(device):
    """forward_train's mean and biased variance against float64, in every layout, with 256k
    values per channel: within torch's contiguous-kernel error on the same values + 1 ulp."""
    shape = (4, 2, 256, 256)
    x = hard_input(shape, "contiguous", device)
    err_t, slack = errors(x, 4)
    x64 = x.double()
    mean_ref = x64.mean((0, 2, 3))
    var_ref = x64.var((0, 2, 3), unbiased=False)
    for layout in ("contiguous", "channels_last", "sliced_channels"):
        xl = in_layout(x.double(), torch.float32, layout, device)
        _, mean, invstd, var = torch.ops.fusedbn.forward_train(xl, None, None, 1e-5)
        assert mean.dtype == var.dtype == invstd.dtype == torch.float32
        e_mean = (mean.double() - mean_ref).abs().max().item()
        e_var = ((var.double() - var_ref).abs() / var_ref).max().item()
        assert e_mean <= err_t["torch"]["mean"] + slack["mean"], (layout, e_mean)
        assert e_var <= err_t["torch"]["var (relative)"] + slack["var (relative)"], (
            layout, e_var)
        torch.testing.assert_close(invstd.double(), (var.double() + 1e-5).rsqrt(), rtol=1e-6,
                                   atol=0)


@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[3], DTYPE_PAIRS[4]], ids=dtype_pair_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_values_whose_squares_overflow(device, dtypes, layout):
    """x ~ 2000 +- 300 in float16: x^2 ~ 4e6 > 65504. Statistics must be accumulated in float32."""
    shape = (8, 3, 16, 16)
    trio = Trio(4, 3, *dtypes, device)
    for step in range(2):
        x = in_layout(2000 + 300 * torch.randn(shape, dtype=torch.float64), dtypes[0], layout,
                      device)
        dy = in_layout(random_values(shape), dtypes[0], layout, device)
        check_trio_step(trio.train(), x, dy, "step %d: " % step)


@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[0], DTYPE_PAIRS[5]], ids=dtype_pair_id)
def test_constant_channel(device, dtypes):
    """A channel with zero variance: x_hat = 0, y = bias; the gradient goes through invstd =
    1/sqrt(eps)."""
    shape = (4, 3, 5, 5)
    vals = random_values(shape)
    vals[:, 1] = 0.75
    trio = Trio(4, 3, *dtypes, device)
    x = in_layout(vals, dtypes[0], "contiguous", device)
    dy = in_layout(random_values(shape), dtypes[0], "contiguous", device)
    check_trio_step(trio.train(), x, dy)


# ---------------------------------------------------------------------------------------------
# Empty batches
# ---------------------------------------------------------------------------------------------
EMPTY = [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3), (0, 3, 5), (0, 3, 2, 2, 2)]


@pytest.mark.parametrize("shape", EMPTY, ids=["x".join(map(str, s)) for s in EMPTY])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(device, shape, training, momentum):
    """As torch: an empty output, running statistics untouched (num_batches_tracked still counts
    the batch), weight and bias gradients zero."""
    rank = len(shape)
    fused = FUSED_BY_RANK[rank](3, momentum=momentum, device=device).train(training)
    plain = NN_BY_RANK[rank](3, momentum=momentum, device=device).train(training)
    with torch.no_grad():
        for m in (fused, plain):
            m.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            m.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    x = torch.randn(shape, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_t = fused(x), plain(x2)
    assert y.shape == y_t.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    y_t.sum().backward()
    assert x.grad.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    for p in ("weight", "bias"):
        g = getattr(fused, p).grad
        assert g is not None and torch.equal(g, torch.zeros_like(g)), p
        assert torch.equal(g, getattr(plain, p).grad)


def test_empty_batch_functional_and_channels_last(device):
    x = torch.randn(0, 3, 4, 4, device=device).to(memory_format=torch.channels_last)
    rm, rv = torch.full((3,), 0.5, device=device), torch.full((3,), 2.0, device=device)
    y = fusedbn.functional.batch_norm(x, rm, rv, torch.ones(3, device=device),
                                      torch.zeros(3, device=device), training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.full((3,), 0.5, device=device))
    assert torch.equal(rv, torch.full((3,), 2.0, device=device))


# ---------------------------------------------------------------------------------------------
# NaN / Inf
# ---------------------------------------------------------------------------------------------
def poisoned(layout, dtype, device):
    """Channel 0 has one NaN, channel 2 one +inf, channel 3 a +inf and a -inf; channel 1 is
    clean."""
    vals = random_values((4, 4, 5, 5))
    vals[1, 0, 2, 3] = float("nan")
    vals[0, 2, 1, 1] = float("inf")
    vals[2, 3, 0, 0] = float("inf")
    vals[3, 3, 1, 0] = -float("inf")
    return in_layout(vals, dtype, layout, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_training(device, dtype, layout):
    x = poisoned(layout, dtype, device)
    fused = fusedbn.FusedBatchNorm2d(4, device=device, dtype=dtype)
    plain = nn.BatchNorm2d(4, device=device, dtype=dtype)
    y, y_t = fused(x), plain(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_t)), (
        "NaN per channel: ours %s, torch %s" % (torch.isnan(y).sum((0, 2, 3)).tolist(),
                                                torch.isnan(y_t).sum((0, 2, 3)).tolist()))
    assert torch.equal(torch.isinf(y), torch.isinf(y_t))
    torch.testing.assert_close(y[:, 1], y_t[:, 1], **tol(dtype))
    for name in ("running_mean", "running_var"):
        a, b = getattr(fused, name), getattr(plain, name)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (name, a, b)
        torch.testing.assert_close(a[1], b[1], **tol(dtype))


def tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_eval(device, dtype, layout):
    """In eval mode a non-finite input value only affects its own output (x * scale + shift)."""
    x = poisoned(layout, dtype, device)
    fused = fusedbn.FusedBatchNorm2d(4, device=device, dtype=dtype).eval()
    plain = nn.BatchNorm2d(4, device=device, dtype=dtype).eval()
    with torch.no_grad():
        for m in (fused, plain):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
            m.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    y, y_t = fused(x), plain(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_t))
    assert torch.equal(torch.isinf(y), torch.isinf(y_t))
    assert torch.equal(y[torch.isinf(y)], y_t[torch.isinf(y_t)])
    finite = torch.isfinite(y_t)
    torch.testing.assert_close(y[finite], y_t[finite], **tol(dtype))
    assert int(finite.logical_not().sum()) == 4


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_results_are_deterministic(layout):
    """Same input, same call: bitwise the same results on the CPU (the reductions are split by a
    fixed rule, not by thread timing)."""
    shape = (8, 16, 64, 64)
    x = in_layout(random_values(shape), torch.float32, layout, "cpu")
    dy = in_layout(random_values(shape), torch.float32, layout, "cpu")
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    runs = []
    for _ in range(2):
        y, mean, invstd, var = torch.ops.fusedbn.forward_train(x, w, b, 1e-5)
        grads = torch.ops.fusedbn.backward(dy, x, w, mean, invstd, True, [True, True, True])
        runs.append((y, mean, invstd, var) + tuple(grads))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_results_independent_of_thread_count(layout):
    """The reductions are split into chunks by a fixed rule, so 1 thread and several threads give
    bitwise the same statistics and gradients."""
    shape = (4, 6, 96, 96)
    x = in_layout(random_values(shape), torch.float32, layout, "cpu")
    dy = in_layout(random_values(shape), torch.float32, layout, "cpu")
    w = torch.rand(6) + 0.5
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y, mean, invstd, var = torch.ops.fusedbn.forward_train(x, w, None, 1e-5)
            grads = torch.ops.fusedbn.backward(dy, x, w, mean, invstd, True, [True, True, True])
            runs.append((y, mean, invstd, var) + tuple(grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(400, 8, 7, 7), (6, 12, 5, 5)], ids=["7x7-2chunks", "5x5"])
def test_cpu_small_plane_forward_independent_of_thread_count(dtype, shape):
    """Small NCHW planes go through channel blocks walked in memory order (8 channels: with 1, 2
    and 4 threads) or through the split reduction (3 threads): the same bits either way, also when
    a channel is cut into several reduction chunks (400 x 49 values) at a plane's middle."""
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).to(dtype)
    C = shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            runs.append(torch.ops.fusedbn.forward_train(x, w, b, 1e-5))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True,
                                         0.0, 1e-5)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(runs[0][0].double(), ref, atol=tol, rtol=tol)



@pytest.mark.parametrize("shape", [(4, 0, 7, 7), (4, 0, 3, 3)])
def test_cpu_small_plane_forward_no_channels(shape):
    """No channels (the small-plane path must not divide by C): empty statistics, empty output."""
    y, mean, invstd, var = torch.ops.fusedbn.forward_train(torch.randn(shape).bfloat16(), None,
                                                           None, 1e-5)
    assert y.shape == shape and mean.shape == invstd.shape == var.shape == (0,)
