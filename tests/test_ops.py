"""The raw operators torch.ops.fusedbn.*: forward_train, forward_eval, backward (output_mask),
update_running_stats (momentum, cumulative average, empty batch), and torch.library.opcheck of each
(schema, fake kernels, autograd registration, AOT dispatch)."""
import itertools

import pytest
import torch

from bn_testing import assert_parity, in_layout, is_channels_last, random_values, term_scales

ops = torch.ops.fusedbn
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel(C, device, dtype=torch.float32, kind="weight"):
    v = {"weight": 1 + 0.5 * torch.randn(C, dtype=torch.float64),
         "bias": torch.randn(C, dtype=torch.float64),
         "mean": 0.5 * torch.randn(C, dtype=torch.float64),
         "var": 0.5 + torch.rand(C, dtype=torch.float64)}[kind]
    return v.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_train(device, dtype, layout, affine):
    shape = (3, 5, 4, 6)
    x = in_layout(random_values(shape), dtype, layout, device)
    pdt = torch.float32 if dtype != torch.float64 else dtype
    w = channel(5, device, pdt, "weight") if affine else None
    b = channel(5, device, pdt, "bias") if affine else None
    y, mean, invstd, var = ops.forward_train(x, w, b, 1e-3)
    x64 = x.double()
    mean_ref = x64.mean((0, 2, 3))
    var_ref = x64.var((0, 2, 3), unbiased=False)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == invstd.dtype == var.dtype == acc(dtype)
    if layout == "channels_last":
        assert is_channels_last(y)
    elif layout == "contiguous":
        assert y.is_contiguous()
    y_ref = torch.nn.functional.batch_norm(
        x64, None, None, w.double() if affine else None, b.double() if affine else None,
        True, 0.0, 1e-3)
    theirs = (torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-3)
              if dtype != torch.float64 else y_ref)
    assert_parity("output", y, theirs, y_ref, dtype,
                  term_scales(x, x, w, b, True, 1e-3)["output"])
    # statistics: float32 accumulation gives ~1e-7 relative; the values are O(1)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double().cpu(), mean_ref.cpu(), **tol)
    torch.testing.assert_close(var.double().cpu(), var_ref.cpu(), **tol)
    torch.testing.assert_close(invstd.double().cpu(), (var_ref + 1e-3).rsqrt().cpu(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_eval(device, dtype, layout, affine):
    shape = (3, 5, 4, 6)
    x = in_layout(random_values(shape), dtype, layout, device)
    pdt = torch.float32 if dtype != torch.float64 else dtype
    w = channel(5, device, pdt, "weight") if affine else None
    b = channel(5, device, pdt, "bias") if affine else None
    rm, rv = channel(5, device, pdt, "mean"), channel(5, device, pdt, "var")
    rm0, rv0 = rm.clone(), rv.clone()
    y = ops.forward_eval(x, w, b, rm, rv, 1e-3)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert is_channels_last(y)
    d = torch.float64
    y_ref = torch.nn.functional.batch_norm(x.double(), rm.to(d), rv.to(d),
                                           w.to(d) if affine else None,
                                           b.to(d) if affine else None, False, 0.1, 1e-3)
    theirs = (torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, False, 0.1, 1e-3)
              if dtype != torch.float64 else y_ref)
    assert_parity("output", y, theirs, y_ref, dtype,
                  term_scales(x, x, w, b, False, 1e-3, rm, rv)["output"])
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_output_mask(device, mask, train, with_weight, dtype):
    """Requested results match aten.native_batch_norm_backward; the others are empty tensors."""
    shape = (4, 3, 5, 5)
    x = in_layout(random_values(shape), dtype, "contiguous", device)
    dy = in_layout(random_values(shape), dtype, "contiguous", device)
    w = channel(3, device, torch.float32, "weight") if with_weight else None
    rm, rv = channel(3, device, torch.float32, "mean"), channel(3, device, torch.float32, "var")
    eps = 1e-5
    if train:
        _, mean, invstd, _ = ops.forward_train(x, w, None, eps)
    else:
        mean, invstd = rm.clone(), (rv + eps).rsqrt()
    dx, dw, db = ops.backward(dy, x, w, mean, invstd, train, mask)
    d = torch.float64

    def aten(dy_, x_, w_, rm_, rv_, m_, i_):
        return torch.ops.aten.native_batch_norm_backward(
            dy_, x_, w_, rm_, rv_, m_ if train else None, i_ if train else None, train, eps,
            [True, True, True])
    ref = aten(dy.double(), x.double(), w.to(d) if w is not None else None, rm.to(d), rv.to(d),
               mean.to(d), invstd.to(d))
    theirs = aten(dy, x, w, rm, rv, mean, invstd) if (train or dtype == torch.float32) else None
    wdt = w.dtype if w is not None else torch.float32
    scales = term_scales(x, dy, w, None, train, eps, rm, rv)
    for i, (name, got, dt) in enumerate(zip(["grad_input", "grad_weight", "grad_bias"],
                                            (dx, dw, db), (dtype, wdt, wdt))):
        if not mask[i]:
            assert got.numel() == 0, "%s was not requested but has shape %s" % (name,
                                                                                 tuple(got.shape))
            continue
        t = theirs[i] if theirs is not None else None
        if t is not None and t.dtype != dt:
            t = t.to(dt)  # aten returns grad_weight in the input's dtype when weight is None
        assert_parity(name, got, t, ref[i], dt, scales[name])


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
@pytest.mark.parametrize("count", [10, 2, 0])
def test_update_running_stats(device, running_dtype, momentum, count):
    C = 6
    stat_dtype = torch.float64 if running_dtype == torch.float64 else torch.float32
    rm, rv = channel(C, device, running_dtype, "mean"), channel(C, device, running_dtype, "var")
    mean, var = channel(C, device, stat_dtype, "mean"), channel(C, device, stat_dtype, "var")
    nbt = torch.tensor(4, device=device) if momentum is None else None
    rm0, rv0 = rm.clone(), rv.clone()
    ptrs = rm.data_ptr(), rv.data_ptr()
    out = ops.update_running_stats(rm, rv, mean, var, count, momentum, nbt)
    assert out is None
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    if nbt is not None:
        assert int(nbt) == 4, "num_batches_tracked is read, not incremented, by the op"
    if count == 0:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        return
    f = momentum if momentum is not None else 1.0 / 4
    d = torch.float64
    exp_rm = (1 - f) * rm0.to(d) + f * mean.to(d)
    exp_rv = (1 - f) * rv0.to(d) + f * var.to(d) * count / (count - 1)
    assert_parity("running_mean", rm, None, exp_rm, running_dtype)
    assert_parity("running_var", rv, None, exp_rv, running_dtype)
    if momentum == 0.0:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
def opcheck_samples(device):
    x = torch.randn(3, 4, 5, 2, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    _, mean, invstd, var = ops.forward_train(x, w, b, 1e-5)
    dy = torch.randn_like(x)
    return [
        (ops.forward_train.default, (x, w, b, 1e-5)),
        (ops.forward_train.default, (x_cl, None, None, 1e-5)),
        (ops.forward_train.default, (x.bfloat16(), w, b, 1e-5)),
        (ops.forward_eval.default, (x, w, b, rm, rv, 1e-5)),
        (ops.forward_eval.default, (x_cl, None, None, rm, rv, 0.0)),
        (ops.backward.default, (dy, x, w, mean, invstd, True, [True, True, True])),
        (ops.backward.default, (dy, x, None, mean, invstd, False, [True, False, True])),
        (ops.update_running_stats.default, (rm.clone(), rv.clone(), mean, var, 30, 0.1, None)),
        (ops.update_running_stats.default, (rm.clone(), rv.clone(), mean, var, 30, None,
                                            torch.tensor(3, device=device))),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(device, index):
    op, args = opcheck_samples(device)[index]
    results = torch.library.opcheck(op, args)  # raises on the first failing check
    assert results and set(results.values()) == {"SUCCESS"}, results


def test_fake_tensor_shapes_and_layouts():
    """The fake kernels report the real kernels' dtypes, shapes and memory formats (what
    torch.compile plans with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(3, 4, 5, 2).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.ones(4)
    real = ops.forward_train(x, w, None, 1e-5)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = ops.forward_train(fx, fw, None, 1e-5)
    for r, f in zip(real, fake):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


def test_raw_op_argument_errors(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    w = torch.ones(3, device=device)
    _, mean, invstd, _ = ops.forward_train(x, w, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.forward_train: weight must have shape "
                                           r"\(3,\)"):
        ops.forward_train(x, torch.ones(4, device=device), None, 1e-5)
    with pytest.raises(TypeError, match=r"^fusedbn\.forward_eval: running_var must be"):
        ops.forward_eval(x, w, None, mean, invstd.double(), 1e-5)
    with pytest.raises(TypeError, match=r"^fusedbn\.backward: mean must be "):
        ops.backward(x, x, w, mean.double(), invstd, True, [True, True, True])
    with pytest.raises(RuntimeError, match=r"^fusedbn\.backward: invstd must have shape \(3,\)"):
        ops.backward(x, x, w, mean, invstd[:2], True, [True, True, True])
    with pytest.raises(TypeError, match=r"^fusedbn\.forward_train: input must be float32, "
                                        r"float64, float16 or bfloat16"):
        ops.forward_train(x.long(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.forward_train: input must have at least "
                                           r"2 dimensions"):
        ops.forward_train(torch.randn(5, device=device), None, None, 1e-5)
