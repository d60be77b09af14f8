"""CUDA statistics numerics on the emulated CUDA build (tests/emu_testing.py: the csrc/cuda/
sources compiled as C++ and run on the CPU): the two defects of issue 13 and their fixes.

1. |mean| >> std. The statistics must keep their digits when the mean is many spreads away from
   zero, in every layout path of the split reduction (bn_reduce_kernels.cuh): planes (large
   contiguous planes, several segments), packed (small contiguous planes, vector and scalar),
   rows (channels_last, channels_last_3d and (N, C), vector and scalar), (N, C, L) and 3-d,
   for float32 / float64 / float16 / bfloat16, |mean| / std from 0 to 1e6. The rule (issue 13):
       err_emu <= 2 err_cpu + 2 eps max(1, |ref|)     per channel,
   err = |result - ref|, ref the exact statistics of the input's values (computed in long
   double), err_cpu the CPU op's own error on the same input, eps that of the statistics' dtype
   (float32 for float16/bfloat16 input: the accumulation dtype, a stricter bound than the input's
   eps). Checked for forward_train (mean, invstd, var, output), batch_stats (the sync ops) and
   act_forward_train.
2. A channel holding +-Inf: mean +-Inf as in torch (the mean of values holding +Inf is +Inf),
   not NaN (inf - inf in a Chan merge); +Inf with -Inf, or a NaN: mean NaN; the variance and
   invstd NaN for every non-finite channel (torch's var); the running mean then +-Inf / NaN too.
   Also with the non-finite value first in its channel (the value the shift is taken from).
"""
import numpy as np
import pytest
import torch

import fusedbn  # noqa: F401  (registers torch.ops.fusedbn)
from emu_testing import emu_ops

LD = np.longdouble
EPS = 1e-5
CPU = torch.ops.fusedbn

ACC = {torch.float32: torch.float32, torch.float64: torch.float64,
       torch.float16: torch.float32, torch.bfloat16: torch.float32}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
         torch.bfloat16: "bf16"}

# (name, shape, memory format): one or more per layout path of bn_reduce.cuh's planner.
LAYOUTS = [
    ("packed", (4, 8, 5, 5), "contiguous"),           # C*S % V == 0: vector loads across planes
    ("packed14", (8, 4, 14, 14), "contiguous"),
    ("packed_scalar", (4, 3, 5, 5), "contiguous"),    # C*S odd: scalar packed
    ("planes", (2, 3, 48, 48), "contiguous"),         # S = 2304: planes kernel
    ("planes_segments", (2, 2, 80, 80), "contiguous"),  # S = 6400: several segments per plane
    ("planes_odd", (2, 3, 37, 41), "contiguous"),     # unaligned plane starts: head/tail lanes
    ("rows_cl", (4, 8, 5, 5), "channels_last"),       # rows, vector of channels
    ("rows_cl_scalar", (4, 3, 6, 6), "channels_last"),  # C % V != 0: scalar rows
    ("nc", (64, 16), "contiguous"),                   # (N, C): rows
    ("nc_odd", (50, 5), "contiguous"),
    ("ncl", (4, 6, 50), "contiguous"),                # (N, C, L)
    ("3d", (2, 4, 3, 5, 7), "contiguous"),
    ("3d_cl", (2, 4, 3, 5, 7), "channels_last"),
]
RATIOS = [0.0, 1e2, 1e4, 1e6]


def layout(x, fmt):
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    return x.contiguous()


def make_input(shape, dtype, ratio, fmt, std=1.0):
    """Values mean + std * N(0, 1) rounded to dtype, mean = ratio * std (std scaled down where
    the mean would not fit the dtype), a different mean sign per channel."""
    top = torch.finfo(dtype).max / 8
    if ratio * std > top:
        std = top / ratio
    C = shape[1]
    sign = torch.tensor([(-1.0) ** c for c in range(C)], dtype=torch.float64)
    mean = (ratio * std * sign).view([1, C] + [1] * (len(shape) - 2))
    x = (mean + std * torch.randn(shape, dtype=torch.float64)).to(dtype)
    return layout(x, fmt)


def channels(x):
    """(C, M) long double array of the exact values of x, channel by channel."""
    t = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return t.numpy().astype(LD)


def reference(x, eps=EPS):
    """Exact-enough statistics of x per channel, in long double: shifted two-pass with the
    correction term (mean, biased var, invstd)."""
    v = channels(x)
    n = v.shape[1]
    d = v - v[:, :1]
    m = d.sum(axis=1) / n
    e = d - m[:, None]
    m += e.sum(axis=1) / n
    e = d - m[:, None]
    var = (e * e).sum(axis=1) / n
    mean = v[:, 0] + m
    return mean, var, LD(1) / np.sqrt(var + LD(eps))


def reference_output(x, mean, invstd, w, b):
    """The exact normalized output, in x's memory order flattened per channel like channels()."""
    v = channels(x)
    wl = w.double().numpy().astype(LD)[:, None]
    bl = b.double().numpy().astype(LD)[:, None]
    return (v - mean[:, None]) * invstd[:, None] * wl + bl


def err(t, ref):
    a = t.double().numpy().astype(LD) if torch.is_tensor(t) else t
    return np.abs(a - ref)


def bound(cpu_err, ref, dtype):
    eps = LD(torch.finfo(ACC[dtype]).eps)
    return 2 * cpu_err + 2 * eps * np.maximum(LD(1), np.abs(ref))


def check(name, emu_t, cpu_t, ref, dtype):
    e, c = err(emu_t, ref), err(cpu_t, ref)
    b = bound(c, ref, dtype)
    bad = e > b
    assert not bad.any(), "%s: emulated error %s > bound %s (cpu error %s) at %s" % (
        name, e[bad][:4], b[bad][:4], c[bad][:4], np.nonzero(bad)[0][:4])


def flat_out(y):
    """y flattened per channel like channels()."""
    return y.double().transpose(0, 1).reshape(y.shape[1], -1).numpy().astype(LD)


def params(C, dtype):
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.rand(C, dtype=pdt) + 0.5, torch.randn(C, dtype=pdt)


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "ratio%g" % r)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name,shape,fmt", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_large_mean_statistics_every_layout(name, shape, fmt, dtype, ratio):
    emu = emu_ops()
    x = make_input(shape, dtype, ratio, fmt)
    w, b = params(shape[1], dtype)
    mean, var, invstd = reference(x)
    y_e, mean_e, invstd_e, var_e = emu.forward_train(x, w, b, EPS)
    y_c, mean_c, invstd_c, var_c = CPU.forward_train(x, w, b, EPS)
    check("mean", mean_e, mean_c, mean, dtype)
    check("var", var_e, var_c, var, dtype)
    check("invstd", invstd_e, invstd_c, invstd, dtype)
    check_output(x, w, b, y_e, y_c, mean_e, invstd_e, (mean, var, invstd), dtype)


def check_output(x, w, b, y_e, y_c, mean_e, invstd_e, ref, dtype):
    """The normalized output: at most twice the CPU op's error, plus what the emulated
    statistics' own errors (checked above) carry into it, |dmean| |invstd w| + |dinvstd|
    |(x - mean) w|, plus two roundings of the dtype on the terms' scale |x_hat w| + |b| (the
    elementwise pass: a product and a sum, rounded to the dtype)."""
    mean, _, invstd = ref
    y_ref = reference_output(x, mean, invstd, w, b)
    wl = np.abs(w.double().numpy().astype(LD))[:, None]
    xmu = np.abs(channels(x) - mean[:, None])
    carried = (err(mean_e, mean)[:, None] * np.abs(invstd)[:, None] * wl
               + err(invstd_e, invstd)[:, None] * xmu * wl)
    scale = xmu * np.abs(invstd)[:, None] * wl + np.abs(b.double().numpy().astype(LD))[:, None]
    e, c = err(flat_out(y_e), y_ref), err(flat_out(y_c), y_ref)
    bnd = 2 * c + 1.01 * carried + 2 * LD(torch.finfo(dtype).eps) * np.maximum(LD(1), scale)
    bad = e > bnd
    assert not bad.any(), "output: emulated error %s > bound %s (cpu error %s)" % (
        e[bad][:4], bnd[bad][:4], c[bad][:4])


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "ratio%g" % r)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name,shape,fmt", [LAYOUTS[i] for i in (0, 3, 6, 8)],
                         ids=[LAYOUTS[i][0] for i in (0, 3, 6, 8)])
def test_large_mean_sync_batch_stats(name, shape, fmt, dtype, ratio):
    emu = emu_ops()
    x = make_input(shape, dtype, ratio, fmt)
    mean, var, _ = reference(x)
    mean_e, var_e = emu.batch_stats(x)
    # (float64 on the CPU for float32 input: compared as the CPU op rounds them to CUDA's dtype)
    mean_c, var_c = (t.to(mean_e.dtype) for t in CPU.batch_stats(x))
    check("mean", mean_e, mean_c, mean, dtype)
    check("var", var_e, var_c, var, dtype)


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "ratio%g" % r)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name,shape,fmt", [LAYOUTS[i] for i in (1, 3, 6)],
                         ids=[LAYOUTS[i][0] for i in (1, 3, 6)])
def test_large_mean_act_forward(name, shape, fmt, dtype, ratio):
    emu = emu_ops()
    x = make_input(shape, dtype, ratio, fmt)
    w, b = params(shape[1], dtype)
    mean, var, invstd = reference(x)
    args = (x, w, b, None, EPS, 1, 0.0, True)  # relu, with the mask
    _, mean_e, invstd_e, var_e, _ = emu.act_forward_train(*args)
    _, mean_c, invstd_c, var_c, _ = CPU.act_forward_train(*args)
    check("mean", mean_e, mean_c, mean, dtype)
    check("var", var_e, var_c, var, dtype)
    check("invstd", invstd_e, invstd_c, invstd, dtype)


# The examples of issue 13 (before the fix: float32 variance 29 ulp off, invstd 39 ulp; mean 1e4
# std 1e-2: invstd 1.4 % off; float64 at the same data: 3,000-10,000 ulp).
ISSUE_CASES = [
    ("f32_300", (4, 8, 5, 5), torch.float32, 300.0, 1.0),
    ("f32_1e4", (8, 4, 14, 14), torch.float32, 1e4, 1e-2),
    ("f64_300", (4, 8, 5, 5), torch.float64, 300.0, 1.0),
    ("f64_1e4", (8, 4, 14, 14), torch.float64, 1e4, 1e-2),
]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,shape,dtype,mean,std", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_issue_13_examples(name, shape, dtype, mean, std, fmt):
    emu = emu_ops()
    x = layout((mean + std * torch.randn(shape, dtype=torch.float64)).to(dtype), fmt)
    w, b = params(shape[1], dtype)
    ref_mean, ref_var, ref_invstd = reference(x)
    _, mean_e, invstd_e, var_e = emu.forward_train(x, w, b, EPS)
    _, mean_c, invstd_c, var_c = CPU.forward_train(x, w, b, EPS)
    check("mean", mean_e, mean_c, ref_mean, dtype)
    check("var", var_e, var_c, ref_var, dtype)
    check("invstd", invstd_e, invstd_c, ref_invstd, dtype)


# ---------------------------------------------------------------------------------------------
# +-Inf / NaN channels
# ---------------------------------------------------------------------------------------------
INF, NAN = float("inf"), float("nan")
# channel -> [(flat position within the channel, value)]; channel 0 stays clean.
POISON = {1: [(7, INF)], 2: [(5, -INF)], 3: [(3, INF), (11, -INF)], 4: [(9, NAN)],
          5: [(0, INF)], 6: [(0, -INF)], 7: [(0, NAN)], 8: [(0, INF), (4, INF)],
          9: [(2, INF), (6, NAN)]}
C_POISON = 10


def poisoned(shape, dtype, fmt):
    x = torch.randn(shape, dtype=torch.float64) + 3.0
    per = x.transpose(0, 1).reshape(shape[1], -1).clone()
    for c, items in POISON.items():
        for pos, v in items:
            per[c, pos] = v
    x = per.reshape([shape[1], shape[0]] + list(shape[2:])).transpose(0, 1).to(dtype)
    return layout(x, fmt)


def torch_reference(x):
    """torch's statistics of x per channel: mean +-Inf / NaN as torch.mean gives them, biased
    variance as torch.var gives it (NaN on every non-finite channel)."""
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    return xd.mean(dims), xd.var(dims, unbiased=False)


def same_nonfinite(a, b):
    a, b = a.double(), b.double()
    return (torch.equal(torch.isnan(a), torch.isnan(b))
            and torch.equal(torch.isposinf(a), torch.isposinf(b))
            and torch.equal(torch.isneginf(a), torch.isneginf(b)))


INF_LAYOUTS = [("packed", (4, C_POISON, 5, 5), "contiguous"),
               ("planes", (2, C_POISON, 40, 40), "contiguous"),
               ("rows_cl", (4, C_POISON, 5, 5), "channels_last"),
               ("nc", (40, C_POISON), "contiguous"),
               ("3d", (2, C_POISON, 3, 4, 5), "contiguous")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name,shape,fmt", INF_LAYOUTS, ids=[c[0] for c in INF_LAYOUTS])
def test_inf_channels(name, shape, fmt, dtype):
    emu = emu_ops()
    x = poisoned(shape, dtype, fmt)
    w, b = params(C_POISON, dtype)
    t_mean, t_var = torch_reference(x)
    y_e, mean_e, invstd_e, var_e = emu.forward_train(x, w, b, EPS)
    assert same_nonfinite(mean_e, t_mean), (mean_e, t_mean)
    assert same_nonfinite(var_e, t_var), (var_e, t_var)
    assert same_nonfinite(invstd_e, t_var), (invstd_e, t_var)
    assert torch.isfinite(mean_e[0]) and torch.isfinite(invstd_e[0])
    # the clean channel as the CPU op computes it
    _, mean_c, invstd_c, var_c = CPU.forward_train(x, w, b, EPS)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mean_e[0], mean_c[0], **tol)
    torch.testing.assert_close(invstd_e[0], invstd_c[0], **tol)
    # the normalized output: NaN throughout every non-finite channel, as torch's
    assert torch.isfinite(y_e[:, 0]).all()
    assert torch.isnan(y_e[:, 1:]).all()

    # the running statistics take the mean's +-Inf / NaN
    acc = ACC[dtype]
    rm, rv = torch.zeros(C_POISON, dtype=acc), torch.ones(C_POISON, dtype=acc)
    emu.update_running_stats(rm, rv, mean_e, var_e, x.numel() // C_POISON, 0.1, None)
    assert same_nonfinite(rm, t_mean), rm
    assert same_nonfinite(rv, t_var), rv

    # the sync ops' statistics and the fused act forward agree
    mean_s, var_s = emu.batch_stats(x)
    assert same_nonfinite(mean_s, t_mean) and same_nonfinite(var_s, t_var)
    _, mean_a, invstd_a, var_a, _ = emu.act_forward_train(x, w, b, None, EPS, 1, 0.0, False)
    assert same_nonfinite(mean_a, t_mean) and same_nonfinite(invstd_a, t_var)


# ---------------------------------------------------------------------------------------------
# Backward with |mean| >> std: GradOp sums dy * (x - mean) against the saved mean, unshifted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 1e4], ids=lambda r: "ratio%g" % r)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("name,shape,fmt", [LAYOUTS[i] for i in (1, 3, 6, 8)],
                         ids=[LAYOUTS[i][0] for i in (1, 3, 6, 8)])
def test_large_mean_backward_sums(name, shape, fmt, dtype, ratio):
    """x - mean is taken against the saved mean, which lies among the values: the difference is
    (nearly) exact and the products dy * (x - mean) are of the spread's size, so the sums need no
    shift. Rule for a sum with cancellation: err_emu <= 2 err_cpu + 16 eps sum|terms| (the
    float32 accumulation of a tree of sums; the CPU accumulates float32 input in float64)."""
    emu = emu_ops()
    x = make_input(shape, dtype, ratio, fmt)
    dy = layout(torch.randn(shape, dtype=torch.float64).to(dtype), fmt)
    w, _ = params(shape[1], dtype)
    _, mean, invstd, _ = CPU.forward_train(x, w, None, EPS)
    g_e = emu.backward(dy, x, w, mean, invstd, True, [True, True, True])
    g_c = CPU.backward(dy, x, w, mean, invstd, True, [True, True, True])
    v, d = channels(x), channels(dy)
    xmu = v - mean.double().numpy().astype(LD)[:, None]
    isd = invstd.double().numpy().astype(LD)
    terms = {"grad_weight": d * xmu * isd[:, None], "grad_bias": d}
    eps = LD(torch.finfo(ACC[dtype]).eps)
    for k, name_ in ((1, "grad_weight"), (2, "grad_bias")):
        ref = terms[name_].sum(axis=1)
        e, c = err(g_e[k], ref), err(g_c[k], ref)
        b = 2 * c + 16 * eps * np.abs(terms[name_]).sum(axis=1)
        assert (e <= b).all(), "%s: emulated error %s, bound %s" % (name_, e, b)
    torch.testing.assert_close(g_e[0], g_c[0], **(
        dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else
        dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
