"""The raw operators of synchronized batch norm: batch_stats, backward_reduce, backward_elemt.

Their statistics are in the accumulation type of the input's device and dtype (csrc/schema.cpp,
fusedbn.ops.sync_stat_dtype): on the CPU float64 for float32 input. On one rank they are pieces
of the one-process ops, computed the same way: rounded to forward_train's dtype, batch_stats gives
forward_train's mean and variance, backward_reduce the sums behind backward's grad_weight and
grad_bias, backward_elemt with those sums and the local count backward's grad_input -- bit for
bit. With sums and a count of several ranks, backward_elemt follows the formula of the whole batch.
Then torch.library.opcheck of each, their empty-batch results and their argument errors."""
import pytest
import torch

from bn_testing import in_layout, random_values
from fusedbn.ops import sync_stat_dtype

ops = torch.ops.fusedbn
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "permuted"]


def _inputs(device, dtype, layout, shape=(3, 5, 7, 6)):
    x = in_layout(random_values(shape), dtype, layout, device)
    dy = in_layout(torch.randn(shape, dtype=torch.float64), dtype, layout, device)
    w = (torch.rand(shape[1], device=device) + 0.5).to(dtype)
    return x, dy, w


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_equal_the_one_process_ops(device, dtype, layout):
    x, dy, w = _inputs(device, dtype, layout)
    sync = sync_stat_dtype(x)
    _, mean, invstd, var = ops.forward_train(x, w, None, 1e-5)
    s_mean, s_var = ops.batch_stats(x)
    assert s_mean.dtype == s_var.dtype == sync
    assert torch.equal(s_mean.to(mean.dtype), mean) and torch.equal(s_var.to(var.dtype), var)
    dx, dw, db = ops.backward(dy, x, w, mean, invstd, True, [True, True, True])
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean.to(sync))
    assert sum_dy.dtype == sum_dy_xmu.dtype == sync
    # backward rounds its sums to forward_train's dtype (csrc/cpu/bn_backward.cpp)
    sum_dy, sum_dy_xmu = (t.to(mean.dtype).to(sync) for t in (sum_dy, sum_dy_xmu))
    assert torch.equal(sum_dy.to(db.dtype), db)
    assert torch.equal((sum_dy_xmu * invstd.to(sync)).to(dw.dtype), dw)
    M = x.numel() // x.shape[1]
    gx = ops.backward_elemt(dy, x, w, mean.to(sync), invstd.to(sync), sum_dy, sum_dy_xmu, M)
    assert torch.equal(gx, dx) and gx.stride() == dx.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_statistics_are_not_rounded_on_the_cpu(layout):
    """float32 input on the CPU: batch_stats and backward_reduce return float64, the reduction's
    own precision (|mean| / std = 1e4: float32 would round the mean by up to 3e-4 std)."""
    shape = (6, 5, 7, 6)
    x64 = 1e4 + torch.randn(shape, dtype=torch.float64)
    x = in_layout(x64, torch.float32, layout, "cpu")
    dy = in_layout(torch.randn(shape, dtype=torch.float64), torch.float32, layout, "cpu")
    ref = x.double().transpose(0, 1).reshape(5, -1)
    mean, var = ops.batch_stats(x)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, ref.mean(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(var, ref.var(1, unbiased=False), rtol=1e-10, atol=0)
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    g = dy.double().transpose(0, 1).reshape(5, -1)
    assert sum_dy.dtype == sum_dy_xmu.dtype == torch.float64
    torch.testing.assert_close(sum_dy, g.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_dy_xmu, (g * (ref - mean[:, None])).sum(1), rtol=1e-12,
                               atol=1e-12)


def test_elemt_uses_the_global_sums_and_count(device):
    """dx = w invstd (dy - sum_dy / M - (x - mean) invstd^2 sum_dy_xmu / M) with M and the sums
    of the whole batch, not of this input."""
    x, dy, w = _inputs(device, torch.float64, "contiguous")
    mean = torch.randn(5, dtype=torch.float64, device=device)
    invstd = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    sum_dy = torch.randn(5, dtype=torch.float64, device=device) * 10
    sum_dy_xmu = torch.randn(5, dtype=torch.float64, device=device) * 10
    M = 1000
    gx = ops.backward_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, M)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    expected = v(w * invstd) * (dy - v(sum_dy) / M - (x - v(mean)) * v(invstd ** 2 * sum_dy_xmu) / M)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch(device, dtype):
    """A rank with no values contributes count 0: zero mean, variance and sums."""
    x = torch.empty(0, 3, 4, 4, device=device, dtype=dtype)
    mean, var = ops.batch_stats(x)
    on_cpu_f32 = device.type == "cpu" and dtype == torch.float32
    assert mean.dtype == (torch.float64 if on_cpu_f32 else torch.float32) and mean.shape == (3,)
    assert not mean.any() and not var.any()
    sum_dy, sum_dy_xmu = ops.backward_reduce(x, x, mean)
    assert not sum_dy.any() and not sum_dy_xmu.any()
    gx = ops.backward_elemt(x, x, None, mean, mean + 1, sum_dy, sum_dy_xmu, 10)
    assert gx.shape == x.shape and gx.dtype == dtype


def _opcheck_samples(device):
    x = torch.randn(3, 4, 5, 2, device=device)
    x_cl = x.bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.rand(4, device=device) + 0.5
    mean, var = ops.batch_stats(x)
    invstd = (var + 1e-5).rsqrt()
    dy = torch.randn_like(x)
    s0, s1 = ops.backward_reduce(dy, x, mean)
    m_cl, i_cl, s0_cl, s1_cl = (t.to(sync_stat_dtype(x_cl)) for t in (mean, invstd, s0, s1))
    return [
        (ops.batch_stats.default, (x,)),
        (ops.batch_stats.default, (x_cl,)),
        (ops.backward_reduce.default, (dy, x, mean)),
        (ops.backward_reduce.default, (x_cl, x_cl, m_cl)),
        (ops.backward_elemt.default, (dy, x, w, mean, invstd, s0, s1, 2 * 30)),
        (ops.backward_elemt.default, (x_cl, x_cl, None, m_cl, i_cl, s0_cl, s1_cl, 30)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(device, index):
    op, args = _opcheck_samples(device)[index]
    results = torch.library.opcheck(op, args)
    assert results and set(results.values()) == {"SUCCESS"}, results


def test_argument_errors(device):
    x, dy, w = _inputs(device, torch.float32, "contiguous")
    mean, var = ops.batch_stats(x)
    with pytest.raises(TypeError, match=r"fusedbn.batch_stats: input must be float32, float64"):
        ops.batch_stats(x.int())
    with pytest.raises(RuntimeError, match=r"fusedbn.backward_reduce: mean must have shape \(5,\)"):
        ops.backward_reduce(dy, x, mean[:4])
    with pytest.raises(RuntimeError, match=r"fusedbn.backward_reduce: grad_output must have"):
        ops.backward_reduce(dy[:1], x, mean)
    # float32 input: float64 statistics on the CPU, float32 on CUDA
    want, other = ("float64", torch.float32) if device.type == "cpu" else ("float32", torch.float64)
    with pytest.raises(TypeError, match=r"fusedbn.backward_elemt: sum_dy must be %s for float32 "
                                        r"input" % want):
        ops.backward_elemt(dy, x, w, mean, var, mean.to(other), mean, 200)
    with pytest.raises(TypeError, match=r"fusedbn.backward_reduce: mean must be %s" % want):
        ops.backward_reduce(dy, x, mean.to(other))
    with pytest.raises(RuntimeError, match=r"backward_elemt: count must be the number of values "
                                           r"per channel over all ranks, at least this input's 126"):
        ops.backward_elemt(dy, x, w, mean, var, mean, mean, 125)
