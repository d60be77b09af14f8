"""The fused batch norm + activation ops on the persistent single-read rows paths (issue 15) under
the CUDA emulation: act_forward_train through persistent_rows_kernel with ActStore
(csrc/cuda/bn_act_forward.cu: ApplyFn's map, the residual read and y and the packed mask written
from the tile of x), act_backward from the mask, the input and the output through
persistent_rows_backward_kernel with MaskedGradOp / InputGradOp / OutputGradOp
(csrc/cuda/bn_act_backward.cu: dz formed where dy, x (y), the mask and r are loaded, kept in the
dy tile -- and, from the output, x_hat / invstd recovered from y in the x tile --, grad_residual =
dz written from the dx step).

- the path taken (kernel names from the traffic counter): persistent for the rows layouts
  (channels_last 2-D / 3-D, (N, C)) in training mode (the backward: with grad_input asked for);
  the streaming launches where the slab does not fit, when the persistent paths are turned off,
  in eval mode, without grad_input (the contiguous layout's persistent paths:
  tests/test_cuda_emu_persistent_act_nchw.py), and -- the forward with save_mask -- where
  the lanes cannot form whole mask bytes (C % 8 != 0, or the lanes of a byte across two warp
  rows: float64 C = 40 has TX = 10 lanes of 2 channels, 4 lanes a byte);
- what is bitwise and what is judged by the float64 rule: on one CTA per channel column (1 SM x
  1 block: gy = 1 partial per channel, the streaming reduction then has 1 split) both paths cut
  the rows the same way, so every output -- y, mean, invstd, var, mask; dx, dweight, dbias,
  grad_residual -- is the streaming path's bit for bit (the element-wise maps are the same code:
  act_affine, store_mask_bits' bytes = act_ew_apply's, GradOp's sums over the same dz,
  grad_dx); on 8 SMs (gy > 1 contiguous row ranges against interleaved splits) the reductions'
  rounding differs, so the statistics, y and the gradients of batch norm are judged by the rule
  against the CPU op and the long-double reference, while the mask is exactly the bits of the
  persistent y (and the CPU op's mask), and grad_residual -- dz depends on no reduction -- is the
  streaming path's bit for bit; every persistent result the same bits under two seeds;
- activations identity, relu, leaky_relu, silu, gelu_tanh (the mask: relu, leaky_relu), residual
  present / absent, save_mask on / off, the backward's output masks, weight None, the dtype pairs
  of the persistent tests (float32, float64, float16, bfloat16 inputs; float32 parameters with
  half inputs), +-Inf and NaN;
- traffic (tests/test_cuda_emu_traffic.py asserts it at the ResNet shapes): x read once (+ the
  shift values), r once, y and the mask written once; dy, x (y) and the mask read once, dx and
  grad_residual written once.
"""
import numpy as np
import pytest
import torch

import emu_reference as R
from emu_testing import emu_config, emu_ops, require_emu, traffic
from test_cuda_emu_ops import CPU, EPS, params, run_emu
from test_cuda_emu_persistent import DTYPE_PAIRS, pair_id, rows_input

FWD = "persistent_rows_kernel"
BWD = "persistent_rows_backward_kernel"
ACTS = {"identity": (0, 0.0), "relu": (1, 0.0), "leaky_relu": (2, 0.1), "silu": (3, 0.0),
        "gelu_tanh": (4, 0.0)}
MASKED = ("relu", "leaky_relu")
ALL4 = [True, True, True, True]
ONE_CTA = dict(sm_count=1, blocks_per_sm=1)  # gy = 1: the streaming reduction's partition
MANY = dict(sm_count=8, blocks_per_sm=0)


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def shape_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def memory_order(t):
    """The elements of a dense tensor in memory order (the mask's element order)."""
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(*dims).reshape(-1)


def mask_of(y, act):
    """The packed sign mask of the output y: bit e % 8 of byte e / 8 for the e-th element in
    memory order; relu counts NaN as positive (positive_output, csrc/activation.h)."""
    v = memory_order(y).double()
    bits = ~(v <= 0) if act == "relu" else v > 0
    return torch.from_numpy(np.packbits(bits.numpy().astype(np.uint8), bitorder="little"))


def counted(name, *args):
    """The emulated op once under the traffic counter: (its results, kernel names, OpTraffic)."""
    with traffic() as t:
        out = getattr(emu_ops(), name)(*args)
    assert len(t.calls) == 1
    return out, t.calls[0].kernels(), t.calls[0]


def fwd_args(shape, pair, act, residual, save, cl=True, seed=0):
    x = rows_input(shape, pair[0], cl, seed=seed)
    r = rows_input(shape, pair[0], cl, seed=seed + 5) if residual else None
    w, b = params(shape[1], pair[1])
    code, slope = ACTS[act]
    return (x, w, b, r, EPS, code, slope, save)


def bwd_args(shape, pair, act, residual, source, out_mask=ALL4, cl=True, weight=True):
    """act_backward's arguments from the CPU forward (training mode); source 1: the mask, 2: the
    output (the forward's y in place of x; the reference recomputes from x_of(shape, pair))."""
    x = rows_input(shape, pair[0], cl)
    dy = rows_input(shape, pair[0], cl, seed=1)
    r = rows_input(shape, pair[0], cl, seed=5) if residual else None
    w, b = params(shape[1], pair[1])
    if not weight:
        w = None
    code, slope = ACTS[act]
    y, mean, invstd, _, mask = CPU.act_forward_train(x, w, b, r, EPS, code, slope, source == 1)
    return (dy, y if source == 2 else x, r, mask if source == 1 else None, w, b, mean, invstd,
            True, code, slope, source, list(out_mask))


def assert_all_bitwise(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        R.assert_bitwise_equal(u, v, "%s output %d" % (what, i))


# ---- the path taken -----------------------------------------------------------------------------

PATH_SHAPES = [((4, 32, 6, 6), True), ((300, 24), False), ((2, 8, 3, 4, 5), True)]


@pytest.mark.parametrize("shape,cl", PATH_SHAPES, ids=shape_id)
def test_forward_takes_the_persistent_path(shape, cl):
    args = fwd_args(shape, (torch.float32, torch.float32), "relu", True, True, cl)
    with emu_config(**MANY):
        _, ks, _ = counted("act_forward_train", *args)
        assert ks == [FWD], ks
        with emu_config(persistent=False):
            _, ks, _ = counted("act_forward_train", *args)
        assert ks[:2] == ["reduce_rows_kernel", "merge_partials_kernel"] and len(ks) == 3, ks
        assert ks[2] in ("act_ew_rows_kernel", "act_ew_kernel"), ks


@pytest.mark.parametrize("shape,cl,dtype,persistent_with_mask", [
    ((4, 64, 7, 7), True, torch.float32, True),     # TX = 16 lanes of 4: 2 lanes a byte
    ((4, 64, 7, 7), True, torch.float64, True),     # TX = 32 lanes of 2: 4 lanes a byte
    ((200, 100), False, torch.float32, False),      # C % 8 == 4: bytes across rows
    ((5, 7, 3, 3), True, torch.float32, False),     # C odd
    ((2, 40, 4, 4, 4), True, torch.float64, False),  # TX = 10 lanes of 2: bytes across rows
    ((2, 40, 4, 4, 4), True, torch.float16, True),  # TX = 5 lanes of 8: a byte each
], ids=lambda v: shape_id(v) if isinstance(v, tuple) else str(v)[6:] if "torch" in str(v)
    else str(v))
def test_forward_mask_bytes_or_streaming(shape, cl, dtype, persistent_with_mask):
    """save_mask needs whole mask bytes per lane group (rows_mask_bytes_fit), else the streaming
    path; without the mask the persistent path takes every one of these. Either way the results
    are the path's own (the streaming ones: those of persistent=False bit for bit)."""
    for save in (True, False):
        args = fwd_args(shape, (dtype, dtype), "leaky_relu", True, save, cl)
        with emu_config(**MANY):
            out, ks, _ = counted("act_forward_train", *args)
            with emu_config(persistent=False):
                stream = emu_ops().act_forward_train(*args)
        expect = persistent_with_mask or not save
        assert (ks == [FWD]) == expect, (save, ks)
        if not expect:
            assert_all_bitwise(out, stream, "streaming fallback")
        if save:
            assert torch.equal(out[4], mask_of(out[0], "leaky_relu"))


def check_fallback(op, args, kernel, small, large):
    """Under the emulator configuration `small` the op falls back to the streaming path, which
    rewrites every output: those of persistent=False bit for bit; under `large` it takes
    `kernel`."""
    with emu_config(**small):
        out, ks, _ = counted(op, *args)
        with emu_config(persistent=False):
            stream = getattr(emu_ops(), op)(*args)
    assert kernel not in ks, ks
    assert_all_bitwise(out, stream, "fallback")
    with emu_config(**large):
        _, ks, _ = counted(op, *args)
    assert ks == [kernel], ks


def test_forward_streaming_when_the_slab_does_not_fit():
    """(8, 128, 16, 16) float32, 1 MB of x: not on one co-resident CTA of <= 227 KB; 8 SMs x 2
    hold it."""
    args = fwd_args((8, 128, 16, 16), (torch.float32, torch.float32), "relu", True, True)
    check_fallback("act_forward_train", args, FWD, ONE_CTA, dict(sm_count=8, blocks_per_sm=2))


@pytest.mark.parametrize("source,act,train,out_mask,cl,expect", [
    (1, "relu", True, ALL4, True, [BWD]),
    (1, "leaky_relu", True, [True, False, False, True], False, [BWD]),
    (0, "silu", True, ALL4, True, [BWD]),
    (0, "leaky_relu", True, [True, True, True, False], False, [BWD]),
    (1, "relu", False, ALL4, True, None),                     # eval mode
    (1, "relu", True, [False, True, True, True], True, None),  # no grad_input
    (0, "silu", True, [False, True, True, False], True, None),
    (2, "leaky_relu", True, ALL4, True, [BWD]),                # the output source
    (2, "identity", True, [True, True, True, False], False, [BWD]),
    (2, "leaky_relu", False, ALL4, True, None),                # eval mode
    (2, "identity", True, [False, True, True, True], True, None),
    (1, "relu", True, ALL4, "nchw", ["persistent_nchw_backward_kernel"]),
    (0, "gelu_tanh", True, ALL4, "nchw", ["persistent_nchw_backward_kernel"]),
    (2, "leaky_relu", True, ALL4, "nchw", ["persistent_nchw_backward_kernel"]),
])
def test_backward_path(source, act, train, out_mask, cl, expect):
    """Persistent for the mask, input and output sources in training mode with grad_input, in
    the rows layouts and in NCHW (tests/test_cuda_emu_persistent_act_nchw.py); the streaming
    launches otherwise (and with the persistent paths off)."""
    shape = (300, 24) if cl is False else (4, 32, 6, 6)
    args = list(bwd_args(shape, (torch.float32, torch.float32), act, True, source, out_mask,
                         cl=cl is True))
    args[8] = train
    with emu_config(**MANY):
        _, ks, _ = counted("act_backward", *args)
        if expect is not None:
            assert ks == expect, ks
            with emu_config(persistent=False):
                _, ks, _ = counted("act_backward", *args)
        assert not any(k.startswith("persistent_") for k in ks), ks


def test_backward_streaming_when_the_tiles_do_not_fit():
    """dy and x of (8, 128, 16, 16) float32 (2 MB) do not fit 4 SMs x 2 CTAs; 16 SMs x 1 hold
    them."""
    for source, act in ((1, "relu"), (0, "silu")):
        args = bwd_args((8, 128, 16, 16), (torch.float32, torch.float32), act, True, source)
        check_fallback("act_backward", args, BWD, dict(sm_count=4, blocks_per_sm=2),
                       dict(sm_count=16, blocks_per_sm=1))


# ---- one CTA per column: the streaming path's bits ----------------------------------------------

ONE_CTA_SHAPES = [((4, 32, 6, 6), True), ((300, 24), False), ((2, 8, 3, 4, 5), True)]


def forward_bitwise_cases():
    out = []
    for i, act in enumerate(ACTS):
        for j, (shape, cl) in enumerate(ONE_CTA_SHAPES):
            for residual in (True, False):
                pair = DTYPE_PAIRS[(i + 2 * j + residual) % len(DTYPE_PAIRS)]
                out.append(pytest.param(act, shape, cl, pair, residual, id="%s-%s-%s-%s" % (
                    act, shape_id(shape), pair_id(pair), "res" if residual else "nores")))
    return out


@pytest.mark.parametrize("act,shape,cl,pair,residual", forward_bitwise_cases())
def test_forward_one_cta_is_the_streaming_path_bitwise(act, shape, cl, pair, residual):
    """gy = 1: y, mean, invstd, var and the mask (where the activation has one) bit for bit."""
    for save in ((True, False) if act in MASKED else (False,)):
        args = fwd_args(shape, pair, act, residual, save, cl)
        with emu_config(**ONE_CTA):
            out, ks, call = counted("act_forward_train", *args)
            assert ks == [FWD] and call.launches[0].grid[:2] == (1, 1), (ks, call.launches)
            with emu_config(persistent=False):
                stream = emu_ops().act_forward_train(*args)
        assert_all_bitwise(out, stream, "%s save_mask=%s" % (act, save))
        assert out[4].numel() == (stream[0].numel() + 7) // 8 * save


def backward_bitwise_cases():
    combos = [(1, "relu"), (1, "leaky_relu"), (0, "relu"), (0, "leaky_relu"), (0, "silu"),
              (0, "gelu_tanh"), (2, "leaky_relu"), (2, "identity")]
    masks = [ALL4, [True, False, False, True], [True, True, True, False],
             [True, False, True, False]]
    out = []
    for i, (source, act) in enumerate(combos):
        for j, (shape, cl) in enumerate(ONE_CTA_SHAPES):
            pair = DTYPE_PAIRS[(i + 2 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 0
            weight = (i + j) % 3 != 2
            om = masks[(i + j) % len(masks)]
            out.append(pytest.param(source, act, shape, cl, pair, residual, weight, om,
                                    id="src%d-%s-%s-%s-%s-%s-%s" % (
                                        source, act, shape_id(shape), pair_id(pair),
                                        "res" if residual else "nores",
                                        "w" if weight else "now",
                                        "".join("1" if v else "0" for v in om))))
    return out


@pytest.mark.parametrize("source,act,shape,cl,pair,residual,weight,out_mask",
                         backward_bitwise_cases())
def test_backward_one_cta_is_the_streaming_path_bitwise(source, act, shape, cl, pair, residual,
                                                        weight, out_mask):
    """gy = 1: dx, dweight, dbias, grad_residual bit for bit (the outputs not asked for are the
    same empty tensors)."""
    args = bwd_args(shape, pair, act, residual, source, out_mask, cl, weight)
    with emu_config(**ONE_CTA):
        out, ks, call = counted("act_backward", *args)
        assert ks == [BWD] and call.launches[0].grid[:2] == (1, 1), (ks, call.launches)
        with emu_config(persistent=False):
            stream = emu_ops().act_backward(*args)
    assert_all_bitwise(out, stream, "source %d %s" % (source, act))
    for o, asked in zip(out, out_mask):
        assert (o.numel() > 0) == asked


# ---- many CTAs per column: the rule ---------------------------------------------------------

# Rows enough for gy > 1 CTAs per column on 8 SMs (at least 8 vectors per thread each) in most
# dtypes; C = 24 with float32 has idle lanes (TX = 6: 5 rows of a warp).
MANY_SHAPES = [((8, 64, 8, 8), True), ((8, 24, 10, 10), True), ((4, 40, 4, 8, 8), True),
               ((1000, 32), False)]


def many_cases(n_acts):
    out = []
    for i, act in enumerate(list(ACTS)[:n_acts]):
        for j, (shape, cl) in enumerate(MANY_SHAPES):
            pair = DTYPE_PAIRS[(i + 3 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 0
            out.append(pytest.param(act, shape, cl, pair, residual, id="%s-%s-%s-%s" % (
                act, shape_id(shape), pair_id(pair), "res" if residual else "nores")))
    return out


@pytest.mark.parametrize("act,shape,cl,pair,residual", many_cases(5))
def test_forward_many_ctas_rule(act, shape, cl, pair, residual):
    """gy > 1: y, mean, invstd, var by the rule (CPU op, long-double reference), two seeds bit for
    bit (run_emu); the mask exactly the bits of the persistent y and the CPU op's mask."""
    save = act in MASKED
    args = fwd_args(shape, pair, act, residual, save, cl)
    with emu_config(**MANY):
        _, ks, call = counted("act_forward_train", *args)
        streaming = save and pair[0] == torch.float64 and shape[1] == 40  # TX = 10 lanes of 2
        assert (ks == [FWD]) != streaming, ks
        if shape == (8, 64, 8, 8):
            assert call.launches[0].grid[1] > 1, call.launches
        emu = run_emu("act_forward_train", *args)
    cpu = CPU.act_forward_train(*args)
    x, w, b, r = args[:4]
    code, slope = ACTS[act]
    _, mean, invstd, var = R.fwd_train(x, w, b, EPS)
    y = R.act_f(R.act_z(x, w, b, r, mean, invstd), code, slope)
    for nm, e, c, ref in zip(("output", "mean", "invstd", "var", "mask"), emu, cpu,
                             (y, mean, invstd, var, 0)):
        R.assert_rule(nm, e, c, ref)
    if save:
        assert torch.equal(emu[4], mask_of(emu[0], act))


def backward_many_cases():
    out = []
    combos = [(1, "relu"), (1, "leaky_relu"), (0, "silu"), (0, "gelu_tanh"), (0, "relu"),
              (2, "leaky_relu"), (2, "identity")]
    for i, (source, act) in enumerate(combos):
        for j, (shape, cl) in enumerate(MANY_SHAPES):
            pair = DTYPE_PAIRS[(i + 3 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 1
            out.append(pytest.param(source, act, shape, cl, pair, residual,
                                    id="src%d-%s-%s-%s-%s" % (source, act, shape_id(shape),
                                                              pair_id(pair),
                                                              "res" if residual else "nores")))
    return out


@pytest.mark.parametrize("source,act,shape,cl,pair,residual", backward_many_cases())
def test_backward_many_ctas_rule(source, act, shape, cl, pair, residual):
    """gy > 1: dx, dweight, dbias by the rule against the CPU op and batch norm's backward of the
    long-double dz; grad_residual the streaming path's bit for bit (and by the rule)."""
    args = bwd_args(shape, pair, act, residual, source)
    with emu_config(**MANY):
        _, ks, call = counted("act_backward", *args)
        assert ks == [BWD], ks
        if shape == (8, 64, 8, 8):
            assert call.launches[0].grid[1] > 1, call.launches
        emu = run_emu("act_backward", *args)
        with emu_config(persistent=False):
            stream = emu_ops().act_backward(*args)
    cpu = CPU.act_backward(*args)
    dy, x, r, _, w, b, mean, invstd = args[:8]
    if source == 2:  # the reference from x, not from the y the op recovers x_hat from
        x = rows_input(shape, pair[0], cl)
    code, slope = ACTS[act]
    z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
    dz = R.act_grad(z, R.ld(dy), code, slope)
    dx, dw, db = R.bwd(torch.from_numpy(dz.astype(np.float64)), x, w, mean, invstd, True)
    for nm, e, c, ref in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), emu,
                             cpu, (dx, dw, db, dz)):
        R.assert_rule(nm, e, c, ref)
    R.assert_bitwise_equal(emu[3], stream[3], "grad_residual")


# ---- +-Inf and NaN ------------------------------------------------------------------------------

def nonfinite_fill(t, places):
    for idx, v in places:
        t[idx] = v


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
def test_forward_nonfinite(act):
    """+-Inf and NaN in x and in r: NaN and Inf where the streaming path has them, the finite
    values by the rule, the mask the bits of y (NaN positive for relu)."""
    shape = (4, 16, 5, 5)
    save = act in MASKED
    args = list(fwd_args(shape, (torch.float32, torch.float32), act, True, save))
    nonfinite_fill(args[0], [((1, 2, 3, 4), float("inf")), ((2, 5, 1, 1), float("nan"))])
    nonfinite_fill(args[3], [((0, 3, 0, 0), float("-inf")), ((3, 6, 2, 2), float("nan")),
                             ((0, 7, 1, 1), float("inf"))])
    with emu_config(**MANY):
        _, ks, _ = counted("act_forward_train", *args)
        assert ks == [FWD], ks
        emu = run_emu("act_forward_train", *args)
        with emu_config(persistent=False):
            stream = emu_ops().act_forward_train(*args)
    cpu = CPU.act_forward_train(*args)
    x, w, b, r = args[:4]
    code, slope = ACTS[act]
    with np.errstate(invalid="ignore"):
        _, mean, invstd, var = R.fwd_train(x, w, b, EPS)
        y = R.act_f(R.act_z(x, w, b, r, mean, invstd), code, slope)
    assert not torch.isfinite(cpu[0]).all()
    for i, (nm, ref) in enumerate(zip(("output", "mean", "invstd", "var"),
                                      (y, mean, invstd, var))):
        R.assert_rule(nm, emu[i], cpu[i], ref)
        assert torch.equal(torch.isnan(emu[i]), torch.isnan(stream[i])), nm
        assert torch.equal(torch.isinf(emu[i]), torch.isinf(stream[i])), nm
    if save:
        assert torch.equal(emu[4], mask_of(emu[0], act))


@pytest.mark.parametrize("source,act", [(1, "relu"), (1, "leaky_relu"), (0, "silu"),
                                        (2, "leaky_relu")])
def test_backward_nonfinite(source, act):
    """+-Inf and NaN in x (so in the saved statistics), in dy and in r: the non-finite places of
    the streaming path, grad_residual its bits, the finite values by the rule."""
    shape = (4, 16, 5, 5)
    x = rows_input(shape, torch.float32)
    dy = rows_input(shape, torch.float32, seed=1)
    r = rows_input(shape, torch.float32, seed=5)
    nonfinite_fill(x, [((1, 2, 3, 4), float("inf")), ((2, 5, 1, 1), float("nan"))])
    nonfinite_fill(dy, [((0, 3, 0, 0), float("-inf")), ((3, 6, 2, 2), float("nan"))])
    nonfinite_fill(r, [((1, 9, 2, 3), float("inf"))])
    w, b = params(16, torch.float32)
    code, slope = ACTS[act]
    y, mean, invstd, _, mask = CPU.act_forward_train(x, w, b, r, EPS, code, slope, source == 1)
    args = (dy, y if source == 2 else x, r, mask if source == 1 else None, w, b, mean, invstd,
            True, code, slope, source, ALL4)
    with emu_config(**MANY):
        _, ks, _ = counted("act_backward", *args)
        assert ks == [BWD], ks
        emu = run_emu("act_backward", *args)
        with emu_config(persistent=False):
            stream = emu_ops().act_backward(*args)
    cpu = CPU.act_backward(*args)
    with np.errstate(invalid="ignore"):
        z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
        dz = R.act_grad(z, R.ld(dy), code, slope)
        ref = R.bwd(torch.from_numpy(dz.astype(np.float64)), x, w, mean, invstd, True) + (dz,)
    assert not torch.isfinite(cpu[0]).all()
    for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias", "grad_residual")):
        R.assert_rule(nm, emu[i], cpu[i], ref[i])
        assert torch.equal(torch.isnan(emu[i]), torch.isnan(stream[i])), nm
        assert torch.equal(torch.isinf(emu[i]), torch.isinf(stream[i])), nm
    R.assert_bitwise_equal(emu[3], stream[3], "grad_residual")


# ---- traffic --------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_traffic(dtype, residual):
    """x read once (+ C * (gy + 1) shift values), r read once, y written once, the mask written
    once (numel / 8 bytes); every bulk access within 1.1x of the ideal sectors."""
    shape = (2, 256, 14, 14)
    args = fwd_args(shape, (dtype, dtype), "relu", residual, True)
    x = args[0]
    xbytes = x.numel() * x.element_size()
    with emu_config(**MANY):
        _, ks, call = counted("act_forward_train", *args)
    assert ks == [FWD], ks
    gy = call.launches[0].grid[1]
    table = call.table(xbytes)
    assert call.read("input") == xbytes + 256 * (gy + 1) * x.element_size(), table
    assert call.read("residual") == (xbytes if residual else 0), table
    assert call.written("output") == xbytes and call.read("output") == 0, table
    assert call.written("mask") == x.numel() // 8 and call.read("mask") == 0, table
    assert call.total(big=xbytes // 2) == (3 if residual else 2) * xbytes + (
        call.read("input") - xbytes), table
    for l in call.launches:
        for t in l.tensors.values():
            if t.size >= xbytes // 2:
                for d in (t.read, t.write):
                    assert not d.accesses or d.sector_ratio <= 1.1, table


@pytest.mark.parametrize("source,act,residual", [(1, "relu", False), (0, "silu", True),
                                                 (2, "leaky_relu", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_traffic(dtype, source, act, residual):
    """dy, x (the mask: one byte per vector; r) read once, dx and grad_residual written once."""
    shape = (2, 256, 14, 14)
    args = bwd_args(shape, (dtype, dtype), act, residual, source)
    x = args[1]
    xbytes = x.numel() * x.element_size()
    with emu_config(**MANY):
        _, ks, call = counted("act_backward", *args)
    assert ks == [BWD], ks
    table = call.table(xbytes)
    assert call.read("grad_output") == xbytes and call.read("saved") == xbytes, table
    assert call.written("grad_input") == xbytes and call.written("grad_residual") == xbytes, table
    assert call.read("grad_input") == 0 and call.read("grad_residual") == 0, table
    assert call.read("residual") == (xbytes if residual else 0), table
    V = 16 // x.element_size()
    assert call.read("mask") == (x.numel() // V if source == 1 else 0), table
    assert call.total(big=xbytes // 2) == (4 + residual) * xbytes, table
