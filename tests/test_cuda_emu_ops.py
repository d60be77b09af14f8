"""Every CUDA op of fusedbn, run from the very same .cu sources under the CUDA emulation
(torch.ops.fusedbn_emu, tests/emu_testing.py), against the CPU op (torch.ops.fusedbn) and a
long-double reference with the rule of tests/emu_reference.py; each case runs under two seeds
(block order, fiber order after barriers) and the two results must agree bit for bit.

The matrix samples the cross product of dtype pair x layout x shape per op so that every axis
value meets every op (dtype pairs rotate over the layout/shape cases), sized for CI.
"""
import itertools

import pytest
import torch

import fusedbn  # noqa: F401  (torch.ops.fusedbn)
import emu_reference as R
from bn_testing import DTYPE_PAIRS, dtype_pair_id, in_layout, random_values
from emu_testing import emu_config, emu_ops, require_emu
from fusedbn.ops import sync_stat_dtype

CPU = torch.ops.fusedbn
SEEDS = (1, 2)
EPS = 1e-5

# (layout, shape): every layout the kernels see, C in {1, 3, 1000}, N = 1, planes 1x1, 7x7, 17x19.
CASES = [
    ("contiguous", (8, 3)),             # (N, C): the rows kernel
    ("contiguous", (5, 1000)),
    ("contiguous", (1, 3)),
    ("contiguous", (4, 3, 50)),         # (N, C, L)
    ("contiguous", (4, 3, 7, 7)),       # packed small planes
    ("contiguous", (2, 3, 17, 19)),     # planes
    ("contiguous", (3, 1000, 1, 1)),    # 1x1 planes
    ("contiguous", (1, 1, 7, 7)),       # N = 1, C = 1
    ("contiguous", (2, 3, 4, 5, 6)),    # 3-d
    ("channels_last", (4, 3, 7, 7)),
    ("channels_last", (2, 16, 17, 19)),
    ("channels_last", (2, 1000, 1, 1)),
    ("channels_last", (2, 3, 4, 5, 6)),  # channels_last_3d
    ("channels_last", (4, 8, 9)),        # (N, L, C) storage
    ("sliced_channels", (4, 3, 7, 7)),   # non-dense: copied to contiguous first
    ("sliced_last", (2, 3, 17, 19)),
    ("permuted", (3, 5, 6)),
    ("offset", (4, 3, 7, 7)),            # storage offset: not 16-byte aligned (scalar kernels)
    ("offset", (8, 5)),
    ("offset_cl", (4, 8, 5, 5)),
]


def make_input(shape, dtype, layout, scale=1.0, shift=0.0):
    v = random_values(shape, scale=scale) + shift
    if layout in ("offset", "offset_cl"):
        n = v.numel()
        flat = torch.full((n + 1,), float("nan"), dtype=dtype)[1:]
        if layout == "offset":
            x = flat.view(shape)
        else:
            perm = (0,) + tuple(range(2, len(shape))) + (1,)
            x = flat.view(tuple(shape[i] for i in perm)).permute(
                0, len(shape) - 1, *range(1, len(shape) - 1))
        x.copy_(v.to(dtype))
        assert x.data_ptr() % 16 != 0
        return x
    return in_layout(v, dtype, layout, "cpu")


def params(C, pdtype, affine=True):
    if not affine:
        return None, None
    return (0.5 + torch.rand(C, dtype=torch.float64)).to(pdtype), torch.randn(
        C, dtype=torch.float64).to(pdtype)


def case_params(n_pairs=2):
    """(layout, shape, (input dtype, param dtype)) with the dtype pairs rotating over the cases."""
    out = []
    for i, (layout, shape) in enumerate(CASES):
        for k in range(n_pairs):
            pair = DTYPE_PAIRS[(i * n_pairs + k) % len(DTYPE_PAIRS)]
            out.append(pytest.param(layout, shape, pair,
                                    id="%s-%s-%s" % (layout, "x".join(map(str, shape)),
                                                     dtype_pair_id(pair))))
    return out


def run_emu(name, *args):
    """The emulated op under each seed; the results must agree bit for bit. Returns the first."""
    results = []
    for seed in SEEDS:
        with emu_config(seed=seed):
            res = getattr(emu_ops(), name)(*[a.clone() if isinstance(a, torch.Tensor) else a
                                              for a in args])
        results.append(res if isinstance(res, (tuple, list)) else (res,))
    for i, (a, b) in enumerate(zip(*results)):
        R.assert_bitwise_equal(a, b, "%s output %d under seeds %s" % (name, i, SEEDS))
    return results[0] if len(results[0]) > 1 else results[0][0]


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


# ---- forward ----------------------------------------------------------------------------------

def takes_nchw_paths(x):
    """Inputs the contiguous (N, C, S) kernels see: the persistent NCHW forward where it fits, the
    streaming planes / packed statistics otherwise."""
    if x.dim() < 3 or x.shape[2:].numel() == 1:
        return False
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.is_contiguous() or cl is None or not x.is_contiguous(memory_format=cl)


def check_forward_train(x, w, b, eps=EPS):
    """forward_train under the rule; for NCHW-like inputs also the streaming path
    (persistent=False), which the persistent NCHW forward otherwise takes the place of at these
    sizes (the streaming one remains the path of tensors too large for the chip)."""
    cpu = CPU.forward_train(x, w, b, eps)
    y, mean, invstd, var = R.fwd_train(x, w, b, eps)
    emu = None
    for persistent in (None, False) if takes_nchw_paths(x) else (None,):
        with emu_config(persistent=persistent):  # None: as configured (persistent by default)
            res = run_emu("forward_train", x, w, b, eps)
        for nm, e, c, r in zip(("output", "mean", "invstd", "var"), res, cpu,
                               (y, mean, invstd, var)):
            R.assert_rule(nm if persistent is None else nm + " (streaming)", e, c, r)
        assert res[0].stride() == cpu[0].stride()
        emu = res if emu is None else emu
    return emu


@pytest.mark.parametrize("layout,shape,pair", case_params())
def test_forward_train(layout, shape, pair):
    x = make_input(shape, pair[0], layout)
    check_forward_train(x, *params(shape[1], pair[1]))


def test_forward_train_without_affine():
    check_forward_train(make_input((4, 3, 7, 7), torch.float32, "contiguous"), None, None)


@pytest.mark.parametrize("layout,shape,pair", case_params(1))
def test_forward_eval(layout, shape, pair):
    x = make_input(shape, pair[0], layout)
    C = shape[1]
    w, b = params(C, pair[1])
    rm = torch.randn(C, dtype=torch.float64).to(pair[1])
    rv = (0.5 + torch.rand(C, dtype=torch.float64)).to(pair[1])
    emu = run_emu("forward_eval", x, w, b, rm, rv, EPS)
    R.assert_rule("output", emu, CPU.forward_eval(x, w, b, rm, rv, EPS),
                  R.fwd_eval(x, w, b, rm, rv, EPS))


# ---- backward ---------------------------------------------------------------------------------

MASKS = list(itertools.product([True, False], repeat=3))


def check_backward(x, dy, w, train, mask):
    """backward under the rule; in training mode with grad_input for NCHW-like inputs also the
    streaming path (persistent=False), which the persistent NCHW backward otherwise takes the
    place of at these sizes (as check_forward_train does for the forward)."""
    mean, invstd = CPU.forward_train(x, w, None, EPS)[1:3]
    if not train:
        mean = torch.randn_like(mean)
        invstd = 0.5 + torch.rand_like(invstd)
    cpu = CPU.backward(dy, x, w, mean, invstd, train, list(mask))
    ref = R.bwd(dy, x, w, mean, invstd, train)
    both = train and mask[0] and takes_nchw_paths(x)
    for persistent in (None, False) if both else (None,):
        with emu_config(persistent=persistent):  # None: as configured (persistent by default)
            emu = run_emu("backward", dy, x, w, mean, invstd, train, list(mask))
        for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias")):
            if mask[i]:
                R.assert_rule(nm if persistent is None else nm + " (streaming)", emu[i], cpu[i],
                              ref[i])
            else:
                assert emu[i].numel() == 0 and emu[i].dtype == cpu[i].dtype
        if mask[0]:
            assert emu[0].stride() == cpu[0].stride()


def backward_cases():
    """case_params() x train, the output masks rotating over them."""
    out = []
    for i, p in enumerate(case_params()):
        for t, train in enumerate((True, False)):
            mask = MASKS[(2 * i + t) % len(MASKS)]
            out.append(pytest.param(*p.values, train, mask, id="%s-%s-mask%s" % (
                p.id, "train" if train else "eval", "".join("1" if v else "0" for v in mask))))
    return out


@pytest.mark.parametrize("layout,shape,pair,train,mask", backward_cases())
def test_backward(layout, shape, pair, train, mask):
    x = make_input(shape, pair[0], layout)
    dy = make_input(shape, pair[0], layout if layout != "offset_cl" else "contiguous")
    w, _ = params(shape[1], pair[1])
    check_backward(x, dy, w, train, mask)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("train", [True, False])
def test_backward_every_output_mask(mask, train):
    x = make_input((4, 3, 7, 7), torch.float32, "contiguous")
    check_backward(x, make_input((4, 3, 7, 7), torch.float32, "channels_last"),
                   params(3, torch.float32)[0], train, mask)
    check_backward(x.to(torch.bfloat16), make_input((4, 3, 7, 7), torch.bfloat16, "contiguous"),
                   None, train, mask)


# ---- running statistics -----------------------------------------------------------------------

RUNNING_CASES = [(m, sd, bd, nd) for m in (0.1, None)
                 for sd in (torch.float32, torch.float64)
                 for bd in (torch.float32, torch.float16, torch.bfloat16, "same")
                 for nd in ((torch.int64, torch.float32) if m is None else (torch.int64,))]


@pytest.mark.parametrize("momentum,stat_dtype,buf_dtype,nbt_dtype", RUNNING_CASES)
def test_update_running_stats(momentum, stat_dtype, buf_dtype, nbt_dtype):
    C = 1000
    bd = stat_dtype if buf_dtype == "same" else buf_dtype
    mean, var = torch.randn(C, dtype=stat_dtype), torch.rand(C, dtype=stat_dtype)
    rm0, rv0 = torch.randn(C).to(bd), torch.rand(C).to(bd)
    nbt = torch.tensor(3, dtype=nbt_dtype)
    outs = []
    for seed in SEEDS:
        rm, rv = rm0.clone(), rv0.clone()
        with emu_config(seed=seed):
            emu_ops().update_running_stats(rm, rv, mean, var, 7, momentum, nbt)
        outs.append((rm, rv))
    R.assert_bitwise_equal(outs[0][0], outs[1][0], "running_mean under two seeds")
    rm_c, rv_c = rm0.clone(), rv0.clone()
    CPU.update_running_stats(rm_c, rv_c, mean, var, 7, momentum, nbt)
    f = momentum if momentum is not None else 1.0 / 3
    ref_m, ref_v = R.running(rm0, rv0, mean, var, 7, f)
    R.assert_rule("running_mean", outs[0][0], rm_c, ref_m)
    R.assert_rule("running_var", outs[0][1], rv_c, ref_v)


def test_update_running_stats_empty_batch_and_strided_buffers():
    mean, var = torch.randn(3), torch.rand(3)
    buf = torch.randn(6)
    rm, rv = buf[::2], torch.rand(6)[1::2]
    rm0, rv0 = rm.clone(), rv.clone()
    emu_ops().update_running_stats(rm, rv, mean, var, 0, 0.1, None)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    emu_ops().update_running_stats(rm, rv, mean, var, 4, 0.1, None)
    rm_c, rv_c = rm0.clone(), rv0.clone()
    CPU.update_running_stats(rm_c, rv_c, mean, var, 4, 0.1, None)
    R.assert_rule("running_mean", rm, rm_c, R.running(rm0, rv0, mean, var, 4, 0.1)[0])
    R.assert_rule("running_var", rv, rv_c, R.running(rm0, rv0, mean, var, 4, 0.1)[1])


# ---- sync ops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape,pair", case_params(1))
def test_sync_ops(layout, shape, pair):
    dt = pair[0]
    x = make_input(shape, dt, layout)
    dy = make_input(shape, dt, "contiguous")
    w, _ = params(shape[1], pair[1])
    emu_mean, emu_var = run_emu("batch_stats", x)
    # The CPU sync ops' statistics are float64 for float32 input (the CPU's accumulation type,
    # csrc/schema.cpp), CUDA's float32: compared in CUDA's dtype, i.e. as the CPU op rounds them.
    cpu_mean, cpu_var = (t.to(emu_mean.dtype) for t in CPU.batch_stats(x))
    ref_mean, ref_var = R.batch_stats(x)
    R.assert_rule("mean", emu_mean, cpu_mean, ref_mean)
    R.assert_rule("var", emu_var, cpu_var, ref_var)

    mean = cpu_mean
    sync = sync_stat_dtype(x)
    emu_s = run_emu("backward_reduce", dy, x, mean)
    cpu_s = [t.to(mean.dtype) for t in CPU.backward_reduce(dy, x, mean.to(sync))]
    ref_s = R.backward_reduce(dy, x, mean)
    R.assert_rule("sum_dy", emu_s[0], cpu_s[0], ref_s[0])
    R.assert_rule("sum_dy_xmu", emu_s[1], cpu_s[1], ref_s[1])

    invstd = (cpu_var + EPS).rsqrt()
    count = x.shape[0] * x[0, 0].numel() * 2  # as if a second rank held as many values
    emu_dx = run_emu("backward_elemt", dy, x, w, mean, invstd, cpu_s[0], cpu_s[1], count)
    cpu_dx = CPU.backward_elemt(dy, x, w, *(t.to(sync) for t in (mean, invstd, *cpu_s)), count)
    R.assert_rule("grad_input", emu_dx, cpu_dx,
                  R.backward_elemt(dy, x, w, mean, invstd, cpu_s[0], cpu_s[1], count))


# ---- fused activation ops -----------------------------------------------------------------------

ACTS = [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.0), (4, 0.0)]
ACT_CASES = [("contiguous", (4, 3, 7, 7)), ("channels_last", (2, 16, 5, 5)),
             ("contiguous", (8, 1000)), ("offset", (2, 3, 17, 19)), ("contiguous", (3, 5, 13))]


def act_cases():
    out = []
    for i, (act, slope) in enumerate(ACTS):
        for j, (layout, shape) in enumerate(ACT_CASES):
            pair = DTYPE_PAIRS[(i + 2 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 0
            out.append(pytest.param(act, slope, layout, shape, pair, residual,
                                    id="act%d-%s-%s-%s-%s" % (
                                        act, layout, "x".join(map(str, shape)),
                                        dtype_pair_id(pair), "res" if residual else "nores")))
    return out


def act_inputs(layout, shape, pair, residual):
    x = make_input(shape, pair[0], layout)
    r = make_input(shape, pair[0], "contiguous") if residual else None
    w, b = params(shape[1], pair[1])
    return x, r, w, b


@pytest.mark.parametrize("act,slope,layout,shape,pair,residual", act_cases())
def test_act_forward(act, slope, layout, shape, pair, residual):
    x, r, w, b = act_inputs(layout, shape, pair, residual)
    save = act in (1, 2)
    emu = run_emu("act_forward_train", x, w, b, r, EPS, act, slope, save)
    cpu = CPU.act_forward_train(x, w, b, r, EPS, act, slope, save)
    _, mean, invstd, var = R.fwd_train(x, w, b, EPS)
    y = R.act_f(R.act_z(x, w, b, r, mean, invstd), act, slope)
    for nm, e, c, ref in zip(("output", "mean", "invstd", "var", "mask"), emu, cpu,
                             (y, mean, invstd, var, None)):
        R.assert_rule(nm, e, c, ref if ref is not None else 0)
    C = shape[1]
    rm, rv = torch.randn(C).to(pair[1]), (0.5 + torch.rand(C)).to(pair[1])
    emu = run_emu("act_forward_eval", x, w, b, rm, rv, r, EPS, act, slope, save)
    cpu = CPU.act_forward_eval(x, w, b, rm, rv, r, EPS, act, slope, save)
    X = R.planes(x)
    scale_inv = 1 / R.np.sqrt(R.ld(rv) + R.LD(EPS))
    y = R.act_f(R.act_z(x, w, b, r, R.ld(rm), scale_inv), act, slope)
    R.assert_rule("output", emu[0], cpu[0], y)
    R.assert_rule("mask", emu[1], cpu[1], 0)
    del X


@pytest.mark.parametrize("act,slope,layout,shape,pair,residual", act_cases())
def test_act_backward(act, slope, layout, shape, pair, residual):
    x, r, w, b = act_inputs(layout, shape, pair, residual)
    dy = make_input(shape, pair[0], "contiguous")
    save = act in (1, 2)
    y, mean, invstd, _, mask = CPU.act_forward_train(x, w, b, r, EPS, act, slope, save)
    sources = [0] + ([1] if save else []) + ([2] if act in (0, 2) else [])
    z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
    dz = R.act_grad(z, R.ld(dy), act, slope)
    dz_t = torch.from_numpy(dz.astype(R.np.float64))
    for k, source in enumerate(sources):
        out_mask = [True, True, True, True] if k == 0 else [True, k % 2 == 0, True, k % 2 == 1]
        saved = y if source == 2 else x
        m = mask if source == 1 else None
        args = (dy, saved, r, m, w, b, mean, invstd, True, act, slope, source, out_mask)
        emu = run_emu("act_backward", *args)
        cpu = CPU.act_backward(*args)
        # the reference: batch norm's backward of dz = dy * act'(z), z from x
        dx, dw, db = R.bwd(dz_t, x, w, mean, invstd, True)
        for i, (nm, ref) in enumerate(zip(("grad_input", "grad_weight", "grad_bias",
                                           "grad_residual"), (dx, dw, db, dz))):
            if out_mask[i]:
                R.assert_rule("%s (source %d)" % (nm, source), emu[i], cpu[i], ref)


# ---- special values, empty tensors -------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 3, 7, 7)), ("contiguous", (8, 3)),
                                          ("channels_last", (4, 8, 5, 5)),
                                          ("contiguous", (2, 3, 17, 19))])
def test_nan_channel(layout, shape):
    x = make_input(shape, torch.float32, layout)
    x[1, 1].view(-1)[0] = float("nan")
    check_forward_train(x, *params(shape[1], torch.float32))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5), (4, 0, 3, 3), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty(shape, dtype):
    x = torch.randn(shape).to(dtype)
    C = shape[1]
    w, b = params(C, torch.float32)
    emu = run_emu("forward_train", x, w, b, EPS)
    cpu = CPU.forward_train(x, w, b, EPS)
    for e, c in zip(emu, cpu):
        assert e.shape == c.shape and e.dtype == c.dtype
        # invstd = 1/sqrt(eps): the CPU op computes it in float64 and rounds (issue 12), CUDA in
        # float32, so the two may differ by the last bit; everything else is bit for bit.
        assert torch.equal(e, c) or torch.allclose(
            e, c, rtol=torch.finfo(torch.float32).eps, atol=0)
    emu = run_emu("forward_eval", x, w, b, torch.zeros(C), torch.ones(C), EPS)
    assert emu.shape == x.shape
    mean, invstd = cpu[1], cpu[2]
    emu_b = run_emu("backward", x, x, w, mean, invstd, True, [True, True, True])
    cpu_b = CPU.backward(x, x, w, mean, invstd, True, [True, True, True])
    for e, c in zip(emu_b, cpu_b):
        assert e.shape == c.shape and torch.equal(e, c)
    for e, c in zip(run_emu("batch_stats", x), CPU.batch_stats(x)):
        assert torch.equal(e, c.to(e.dtype))  # (the CPU's are float64 for float32 input)


# ---- grid sizing: SM count, occupancy, many blocks per channel, 64-bit indices -----------------

@pytest.mark.parametrize("sms,bps", [(132, 0), (4, 1), (1, 1), (132, 32)])
@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 3, 7, 7)),
                                          ("contiguous", (2, 3, 40, 40)),
                                          ("channels_last", (8, 32, 9, 9)),
                                          ("contiguous", (64, 5))])
def test_sm_count_and_occupancy(sms, bps, layout, shape):
    x = make_input(shape, torch.float32, layout)
    dy = make_input(shape, torch.float32, layout)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=sms, blocks_per_sm=bps):
        check_forward_train(x, w, b)
        check_backward(x, dy, w, True, (True, True, True))


@pytest.mark.parametrize("sms", [132, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channels_split_over_many_blocks(sms, layout):
    """8x64x64x64: every channel's 32768 values split over many CTAs of pass 1."""
    x = make_input((8, 64, 64, 64), torch.float32, layout)
    w, b = params(64, torch.float32)
    with emu_config(sm_count=sms):
        check_forward_train(x, w, b)


@pytest.mark.parametrize("layout,shape,pair", case_params(1)[::3])
def test_index64_kernels(layout, shape, pair):
    """The 64-bit index instantiations (forced through the test seam) give the 32-bit ones'
    results bit for bit."""
    x = make_input(shape, pair[0], layout)
    dy = make_input(shape, pair[0], "contiguous")
    w, b = params(shape[1], pair[1])
    res = []
    for force in (False, True):
        with emu_config(force_index64=force):
            out = emu_ops().forward_train(x, w, b, EPS)
            back = emu_ops().backward(dy, x, w, out[1], out[2], True, [True, True, True])
            act = emu_ops().act_forward_train(x, w, b, None, EPS, 1, 0.0, True)
        res.append(tuple(out) + tuple(back) + tuple(act))
    for i, (a, c) in enumerate(zip(*res)):
        R.assert_bitwise_equal(a, c, "output %d, 64-bit vs 32-bit index kernels" % i)


# ---- the two numerics defects of issue 13 (fixed; more in test_cuda_emu_numerics.py) ------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 8, 5, 5)),      # packed
                                          ("contiguous", (8, 4, 14, 14)),    # packed
                                          ("contiguous", (2, 3, 40, 40)),    # planes
                                          ("channels_last", (4, 8, 5, 5)),   # rows
                                          ("contiguous", (64, 5))])          # (N, C)
@pytest.mark.parametrize("shift,scale", [(300.0, 1.0), (1e4, 1e-2), (1e6, 1.0)])
def test_large_mean_statistics(dtype, layout, shape, shift, scale):
    x = make_input(shape, dtype, layout, scale=scale, shift=shift)
    check_forward_train(x, *params(shape[1], dtype))


# (The CPU op gives such a channel +-Inf in every layout, as torch does: tests/
# test_cpu_nonfinite.py; tests/test_cuda_emu_numerics.py checks the emulated op's against torch.)
@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 3, 7, 7)), ("contiguous", (8, 3)),
                                          ("channels_last", (4, 8, 5, 5)),
                                          ("contiguous", (2, 3, 17, 19))])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinite_channel(layout, shape, sign):
    x = make_input(shape, torch.float32, layout)
    x[1, 1].view(-1)[0] = sign * float("inf")
    check_forward_train(x, *params(shape[1], torch.float32))


# ---- error paths: the emulated ops raise the CPU ops' errors ----------------------------------

ERROR_CALLS = [
    ("forward_train", lambda: (torch.randn(4), None, None, EPS)),
    ("forward_train", lambda: (torch.randn(4, 3), torch.ones(4), None, EPS)),
    ("forward_train", lambda: (torch.randn(4, 3), None, None, 0.0)),
    ("forward_train", lambda: (torch.randn(4, 3).int(), None, None, EPS)),
    ("forward_train", lambda: (torch.randn(4, 3), torch.ones(3, dtype=torch.float64), None, EPS)),
    ("forward_eval", lambda: (torch.randn(4, 3), None, None, torch.zeros(2), torch.ones(3), EPS)),
    ("backward", lambda: (torch.randn(4, 2), torch.randn(4, 3), None, torch.zeros(3),
                          torch.ones(3), True, [True, True, True])),
    ("update_running_stats", lambda: (torch.zeros(3), torch.ones(3), torch.zeros(3),
                                      torch.ones(3), 1, 0.1, None)),
    ("update_running_stats", lambda: (torch.zeros(3), torch.ones(3), torch.zeros(3),
                                      torch.ones(3), 4, None, None)),
    # (float64: the sync ops' statistics are float64 on both backends; float32 input takes
    # float64 ones on the CPU, float32 ones on CUDA)
    ("backward_elemt", lambda: (torch.randn(4, 3).double(), torch.randn(4, 3).double(), None,
                                torch.zeros(3).double(), torch.ones(3).double(),
                                torch.zeros(3).double(), torch.zeros(3).double(), 2)),
    ("act_forward_train", lambda: (torch.randn(4, 3), None, None, None, EPS, 7, 0.0, False)),
    ("act_forward_train", lambda: (torch.randn(4, 3), None, None, None, EPS, 3, 0.0, True)),
]


@pytest.mark.parametrize("k", range(len(ERROR_CALLS)))
def test_error_paths_match_cpu(k):
    name, make = ERROR_CALLS[k]
    with pytest.raises((RuntimeError, TypeError, ValueError)) as cpu_err:
        getattr(CPU, name)(*make())
    msg = str(cpu_err.value).splitlines()[0]
    assert msg.startswith("fusedbn.")
    with pytest.raises(type(cpu_err.value)) as emu_err:
        getattr(emu_ops(), name)(*make())
    assert str(emu_err.value).splitlines()[0] == msg
