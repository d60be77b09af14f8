"""+-Inf and NaN in the CPU ops' statistics, against torch, in every reduction path of csrc/cpu/.

A channel holding +Inf (and no -Inf, no NaN) has mean +Inf in torch, -Inf likewise; +Inf together
with -Inf, or any NaN, gives mean NaN; the variance of every such channel is NaN ((inf - inf)^2),
so are invstd and the whole channel's output, and the running mean takes the batch mean's +-Inf /
NaN. The fast reductions (Welford lanes, the one-pass moments of small planes, the channels-last
rows) assume finite values; a chunk that is not finite is rebuilt from a scan of its values and the
chunks are merged keeping +-Inf (csrc/cpu/reduce.h, csrc/welford.h). Checked here: the training
forward (statistics, output, running statistics through fusedbn.functional.batch_norm), the fused
activation forward and the synchronized path's batch_stats, for every dtype, in every layout and
plane-size path, with the non-finite value first in its channel, in its middle and last (in
another chunk than the first when the channel has several), on one thread (the per-channel path of
contiguous input) and three (C = 10 is then split into chunks over the threads).
"""
import pytest
import torch
import torch.nn.functional as F

import fusedbn
from bn_testing import assert_parity, in_layout, random_values, term_scales

ops = torch.ops.fusedbn
INF, NAN = float("inf"), float("nan")
EPS = 1e-5
C = 10
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# channel -> [(position in the channel's values, value)]; "mid" and "last" are resolved per shape.
# Channel 0 stays finite (and so do the channels past 9 of the wide cases).
POISON = {1: [("mid", INF)], 2: [("mid", -INF)], 3: [(3, INF), ("last", -INF)],
          4: [("mid", NAN)], 5: [(0, INF)], 6: [(0, -INF)], 7: [(0, NAN)],
          8: [(0, INF), ("last", INF)], 9: [(2, INF), ("mid", NAN)]}

# (id, shape, layout): every path of csrc/cpu/channel_reduce.h.
CASES = [
    ("nc", (40, C), "contiguous"),                      # (N, C) rows, channel blocks
    ("nc_wide", (300, 70), "contiguous"),               # rows of >= 64 channels, 2 chunks
    ("nc_long", (20000, C), "contiguous"),              # 13 chunks of rows
    ("small_planes", (4, C, 7, 7), "contiguous"),       # one-pass moments
    ("planes", (2, C, 17, 19), "contiguous"),           # moments, 323-value planes
    ("large_planes", (4, C, 40, 40), "contiguous"),     # Welford lanes
    ("large_planes_2chunks", (2, C, 120, 120), "contiguous"),  # lanes, 2 chunks per channel
    ("small_planes_2chunks", (400, C, 7, 7), "contiguous"),    # moments, 2 chunks per channel
    ("channels_last", (4, C, 5, 5), "channels_last"),
    ("channels_last_wide", (2, 70, 9, 9), "channels_last"),    # streamed rows
    ("ncl", (4, C, 9), "contiguous"),
    ("nlc", (4, C, 9), "channels_last"),
    ("3d", (2, C, 3, 4, 5), "contiguous"),
    ("3d_channels_last", (2, C, 3, 4, 5), "channels_last"),
]


def poisoned(shape, dtype, layout):
    """random_values with the POISON values, in the layout."""
    v = random_values(shape)
    per = v.transpose(0, 1).reshape(shape[1], -1).clone()  # (C, M) in (n, s) order
    M = per.shape[1]
    where = {"mid": M // 2, "last": M - 1}
    for c, items in POISON.items():
        for pos, value in items:
            per[c, where.get(pos, pos)] = value
    v = per.reshape((shape[1], shape[0]) + tuple(shape[2:])).transpose(0, 1)
    return in_layout(v, dtype, layout, "cpu")


@pytest.fixture(params=[1, 3], ids=["threads1", "threads3"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def torch_stats(x):
    """torch's batch mean and invstd (torch.native_batch_norm, in x's dtype) and the float64
    reference of both."""
    Cx = x.shape[1]
    theirs = torch.native_batch_norm(x, None, None, None, None, True, 0.1, EPS)[1:]
    ref = torch.native_batch_norm(x.double(), None, None, None, None, True, 0.1, EPS)[1:]
    assert torch.isinf(ref[0][1:10]).sum() == 5 and torch.isnan(ref[0][1:10]).sum() == 4
    assert torch.isfinite(ref[0][0]) and torch.isfinite(ref[0][10:]).all() and Cx >= 10
    return theirs, ref


def params(Cx, dtype):
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return (torch.rand(Cx, dtype=torch.float64) + 0.5).to(pdt), torch.randn(
        Cx, dtype=torch.float64).to(pdt)


def check_stats(name, mean, invstd, var, x):
    (t_mean, t_invstd), (r_mean, r_invstd) = torch_stats(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == invstd.dtype == var.dtype == acc
    assert_parity(name + " mean", mean, t_mean.to(acc), r_mean)
    assert_parity(name + " invstd", invstd, t_invstd.to(acc), r_invstd)
    r_var = x.double().transpose(0, 1).reshape(x.shape[1], -1).var(1, unbiased=False)
    assert torch.equal(torch.isnan(var), torch.isnan(r_var)) and not torch.isinf(var).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,shape,layout", CASES, ids=[c[0] for c in CASES])
def test_forward_train(case, shape, layout, dtype, threads):
    """Statistics, output and running statistics of the training forward, as torch's."""
    x = poisoned(shape, dtype, layout)
    Cx = shape[1]
    w, b = params(Cx, dtype)
    y, mean, invstd, var = ops.forward_train(x, w, b, EPS)
    check_stats("forward_train", mean, invstd, var, x)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = torch.randn(Cx, dtype=acc), torch.rand(Cx, dtype=acc) + 0.5
    rm_t, rv_t, rm_r, rv_r = rm.clone(), rv.clone(), rm.double(), rv.double()
    rm_o, rv_o = rm.clone(), rv.clone()
    ours = fusedbn.functional.batch_norm(x, rm_o, rv_o, w, b, True, 0.1, EPS)
    theirs = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, EPS)
    ref = F.batch_norm(x.double(), rm_r, rv_r, w.double(), b.double(), True, 0.1, EPS)
    scale = term_scales(x, x, w, b, True, EPS)["output"]
    assert torch.isnan(ref[:, 1:10]).all() and torch.isfinite(ref[:, 0]).all()
    assert_parity("output", ours, theirs, ref, scale=scale)
    assert torch.equal(ours.nan_to_num(7.0), y.nan_to_num(7.0))  # the op's output
    assert_parity("running_mean", rm_o, rm_t, rm_r)
    assert_parity("running_var", rv_o, rv_t, rv_r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,shape,layout", CASES, ids=[c[0] for c in CASES])
def test_act_forward_and_batch_stats(case, shape, layout, dtype, threads):
    """The fused activation forward and the synchronized path's batch_stats reduce with the same
    kernels: the same statistics as forward_train, bit for bit (NaN where it has NaN)."""
    x = poisoned(shape, dtype, layout)
    w, b = params(shape[1], dtype)
    _, mean, invstd, var = ops.forward_train(x, w, b, EPS)
    y_a, mean_a, invstd_a, var_a, _ = ops.act_forward_train(x, w, b, None, EPS, 1, 0.0, False)
    check_stats("act_forward_train", mean_a, invstd_a, var_a, x)
    for ours, fwd in ((mean_a, mean), (invstd_a, invstd), (var_a, var)):
        assert torch.equal(ours.nan_to_num(7.0), fwd.nan_to_num(7.0))
    # relu of the channel's NaN output stays NaN (torch's relu)
    assert torch.isnan(y_a[:, 1:10]).all() and torch.isfinite(y_a[:, 0]).all()
    s_mean, s_var = ops.batch_stats(x)
    assert torch.equal(s_mean.to(mean.dtype).nan_to_num(7.0), mean.nan_to_num(7.0))
    assert torch.equal(s_var.to(var.dtype).nan_to_num(7.0), var.nan_to_num(7.0))
