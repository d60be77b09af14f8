"""float32 on the CPU accumulates in float64, as torch's CPU kernels do (issue 12).

Every reduction of a float32 input -- the training statistics in every layout and on every path
(NCHW planes large and small, channels-last, (N, C), (N, C, L), 3-d), the backward sums, the
synchronized pieces batch_stats and backward_reduce -- is measured against a float64 reference
computed from the same float32 values, next to torch's own float32 NCHW kernels (which accumulate
in float64: at::acc_type<float, /*is_cuda=*/false> is double). The rule, per quantity:

    err_ours <= 2 * err_torch + floor,   floor = 4 * eps_float32 * max|ref|

err = max |result - ref| over the quantity's values; torch's error is always that of its NCHW
(contiguous) path on the same values, also when ours runs channels-last (torch's channels-last CPU
path accumulates in float32 and is far less exact). The floor is a few roundings of the result
to float32: where torch happens to round closer, which of two float32 results within an ulp of
the exact value is nearer is a coin toss, not a difference in accuracy.

Channels hold 10^2 to 10^7 values, with |mean| / std from 0 to 1e6 (and a zero-mean channel
whose first value is far out: the shift fusedbn sums around must not cost the small mean its
digits). Then: bitwise the same results whatever the number of threads.
"""
import pytest
import torch

from bn_testing import in_layout

ops = torch.ops.fusedbn
aten = torch.ops.aten
EPS = 1e-5
EPS32 = torch.finfo(torch.float32).eps


def make_values(shape, ratio, outlier=False):
    """float64 values, channel c with std s_c in [0.5, 1.5] and mean ratio * s_c * (1 + c / C)
    (ratio 0: zero-mean); with `outlier`, every channel's first value is 1e3 std out."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    std = (0.5 + torch.rand(C, dtype=torch.float64)).view(view)
    mean = ratio * std * (1 + torch.arange(C, dtype=torch.float64).view(view) / C)
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    if outlier:
        idx = (0, slice(None)) + (0,) * (len(shape) - 2)
        x[idx] = mean.flatten() + 1e3 * std.flatten()
    return x


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def reference(x32, dy32, w, b):
    """float64 results from the float32 values: statistics, output, gradients, sums."""
    x, dy, w, b = x32.double(), dy32.double(), w.double(), b.double()
    dims = reduce_dims(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    invstd = (var + EPS).rsqrt()
    xmu = x - mean.view(view)
    y = xmu * (invstd * w).view(view) + b.view(view)
    sum_dy = dy.sum(dims)
    sum_dyx = (dy * xmu).sum(dims)
    M = x.numel() // x.shape[1]
    dx = (w * invstd).view(view) * (dy - (sum_dy / M).view(view)
                                    - xmu * (invstd ** 2 * sum_dyx / M).view(view))
    return dict(mean=mean, var=var, invstd=invstd, y=y, dx=dx, dw=sum_dyx * invstd, db=sum_dy,
                sum_dy=sum_dy, sum_dyx=sum_dyx)


def torch_results(x32, dy32, w, b):
    """torch's own float32 results from its NCHW (contiguous) CPU kernels."""
    x, dy = x32.contiguous(), dy32.contiguous()
    C = x.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    y, mean, invstd = aten.native_batch_norm(x, w, b, rm, rv, True, 1.0, EPS)
    M = x.numel() // C
    dx, dw, db = aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, EPS,
                                                 [True, True, True])
    var = rv.double() * (M - 1) / M  # its unbiased batch variance, rounded once
    # torch's sums are the gradients of the parameters (sum dy * (x - mean) = dw / invstd).
    return dict(mean=mean, var=var, invstd=invstd, y=y, dx=dx, dw=dw, db=db, sum_dy=db,
                sum_dyx=dw.double() / invstd.double())


def fusedbn_results(x32, dy32, w, b):
    y, mean, invstd, var = ops.forward_train(x32, w, b, EPS)
    dx, dw, db = ops.backward(dy32, x32, w, mean, invstd, True, [True, True, True])
    s_mean, s_var = ops.batch_stats(x32)  # float64 (the sync ops' statistics on the CPU)
    sum_dy, sum_dyx = ops.backward_reduce(dy32, x32, s_mean)
    return dict(mean=mean, var=var, invstd=invstd, y=y, dx=dx, dw=dw, db=db, sync_mean=s_mean,
                sync_var=s_var, sum_dy=sum_dy, sum_dyx=sum_dyx)


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def compare(x_values, layout, seed_dy=0):
    """{quantity: (err_ours, err_torch, floor)} for one input."""
    x32 = x_values.float()
    gen = torch.Generator().manual_seed(seed_dy)
    dy32 = torch.randn(x32.shape, generator=gen, dtype=torch.float64).float()
    C = x32.shape[1]
    w = (0.5 + torch.rand(C, generator=gen)).float()
    b = torch.randn(C, generator=gen).float()
    ref = reference(x32, dy32, w, b)
    theirs = torch_results(x32, dy32, w, b)
    ours = fusedbn_results(in_layout(x32.double(), torch.float32, layout, "cpu"),
                           in_layout(dy32.double(), torch.float32, layout, "cpu"), w, b)
    ours_pairs = {q: (ours[q], q) for q in ("mean", "var", "invstd", "y", "dx", "dw", "db",
                                            "sum_dy", "sum_dyx")}
    ours_pairs["sync_mean"] = (ours["sync_mean"], "mean")
    ours_pairs["sync_var"] = (ours["sync_var"], "var")
    out = {}
    for name, (value, q) in ours_pairs.items():
        out[name] = (max_err(value, ref[q]), max_err(theirs[q], ref[q]),
                     4 * EPS32 * ref[q].abs().max().item())
    return out


def check(x_values, layout):
    failures = []
    for name, (ours, theirs, floor) in compare(x_values, layout).items():
        if not ours <= 2 * theirs + floor:
            failures.append("%s: ours %.3g > 2 * torch %.3g + floor %.3g" % (name, ours, theirs,
                                                                             floor))
    assert not failures, "; ".join(failures)


# (shape, layout): the paths of csrc/cpu/channel_reduce.h. With 2+ threads, C = 3 takes the split
# reductions and C = 4 the per-channel path (the same chunks and merges: the same bits).
CASES = [
    ((100, 3), "contiguous"),                   # (N, C): 100 values per channel
    ((16, 3, 700), "contiguous"),               # (N, C, L)
    ((16, 3, 700), "channels_last"),
    ((32, 4, 7, 7), "contiguous"),              # small planes: two-pass per chunk
    ((32, 3, 7, 7), "channels_last"),
    ((4, 4, 64, 64), "contiguous"),             # large planes: Welford lanes
    ((8, 3, 64, 64), "sliced_channels"),        # copied to contiguous first
    ((8, 24, 14, 14), "channels_last"),         # channel blocks
    ((4, 80, 16, 16), "channels_last"),         # whole rows streamed (C >= 64)
    ((2, 3, 8, 16, 16), "contiguous"),          # 3-d
    ((2, 3, 8, 16, 16), "channels_last"),
]
RATIOS = [0.0, 1.0, 1e3, 1e6]


def case_id(case):
    shape, layout = case
    return "%s-%s" % ("x".join(map(str, shape)), layout)


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "mean%g" % r)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_within_torch_error(case, ratio):
    shape, layout = case
    check(make_values(shape, ratio), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_small_mean_next_to_a_large_first_value(layout):
    """A zero-mean channel whose first value is 1e3 std out (the first value is the shift the
    statistics are accumulated around)."""
    check(make_values((16, 4, 48, 48), 0.0, outlier=True), layout)


# Large channels: few, so that the test stays quick.
LARGE = [((8, 2, 250, 250), "contiguous", 1.0),        # 5e5 values per channel
         ((8, 2, 250, 250), "channels_last", 1e3),
         ((16, 2, 256, 256), "contiguous", 1e6),       # 1e6
         ((10, 1, 1000, 1000), "contiguous", 0.0)]    # 1e7


@pytest.mark.parametrize("shape,layout,ratio", LARGE,
                         ids=["%s-%s-mean%g" % ("x".join(map(str, s)), l, r)
                              for s, l, r in LARGE])
def test_float32_large_channels_within_torch_error(shape, layout, ratio):
    check(make_values(shape, ratio), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 6, 40, 40), (64, 6, 7, 7), (32, 80, 6, 6)],
                         ids=["40x40", "7x7", "80ch"])
def test_float32_bits_independent_of_thread_count(shape, layout):
    """The float64 reductions are cut into chunks by a fixed rule: 1 thread and several give the
    same bits for every output of every op (per-channel and split paths included: C = 6 goes
    per channel with 1, 2, 3 or 6 threads and split with 4; channels-last rows of 80 channels are
    streamed whole, with prefetches, in 6 chunks of rows)."""
    x = in_layout(make_values(shape, 3.0), torch.float32, layout, "cpu")
    dy = in_layout(torch.randn(shape, dtype=torch.float64), torch.float32, layout, "cpu")
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            y, mean, invstd, var = ops.forward_train(x, w, b, EPS)
            grads = ops.backward(dy, x, w, mean, invstd, True, [True, True, True])
            sync = ops.batch_stats(x) + ops.backward_reduce(dy, x, mean.double())
            act = ops.act_forward_train(x, w, b, None, EPS, 1, 0.0, False)
            runs.append((y, mean, invstd, var) + tuple(grads) + tuple(sync) + tuple(act[:4]))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_)
