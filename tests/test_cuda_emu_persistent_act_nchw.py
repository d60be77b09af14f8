"""The fused batch norm + activation ops on the persistent single-read path of the contiguous
layout (issue 15) under the CUDA emulation: NCHW, NCDHW and (N, C, L) inputs.
act_forward_train runs persistent_nchw_kernel (csrc/cuda/bn_persistent_nchw.cuh) with
ActNchwStore (csrc/cuda/bn_act_forward.cu: act_affine with the residual read, y and the packed
mask written from the tile of x); act_backward from the mask, the input or the output runs
persistent_nchw_backward_kernel with MaskedGradOp / InputGradOp / OutputGradOp
(csrc/cuda/bn_act_backward.cu: dz -- the masked dy, or act'(z) dy with z recomputed from x and
the residual read there, or from y -- formed as dy is loaded and kept in its tile, and from the
output x_hat / invstd recovered from y in the x tile; the sums, epilogue and dx map of backward,
grad_residual = dz written from the dx step).

- the path taken (kernel names from the traffic counter): persistent in training mode (the
  backward: grad_input asked for); the streaming launches where the slab does not fit, when
  the persistent paths are off, in eval mode, without grad_input; and --
  the forward with save_mask -- where the mask's bytes would not be whole in every window: a
  thread's vector is V consecutive elements, so the forward needs x at the start of its 16-byte
  line (or scalar vectors), packed units of whole blocks of 8 / gcd(S, 8) channels with C a
  multiple of that, and planes (S > a window) with S % 8 == 0;
- bit for bit where the same code runs on the same values: act_forward_train's mean, invstd and
  var are forward_train's (the same reduction and epilogue on the same plan; without save_mask,
  which can group the units differently), and with the identity and no residual its y too;
  act_backward's grad_residual is the streaming path's (dz depends on no reduction), and its dx,
  dweight and dbias are backward's persistent results on that dz (the same GradOp, partition,
  epilogue and map; not for the output source, whose sums and map run on x_hat / invstd); the
  rest by the float64 rule against the CPU op and the long-double reference; the mask exactly
  the bits of the persistent y; every result the same bits under two seeds (run_emu: the
  emulator shuffles the CTAs' order between grid barriers);
- activations identity, relu, leaky_relu, silu, gelu_tanh, residual present / absent, save_mask
  on / off, every dtype pair, packed small planes (S = 36: blocks of 2 channels for the mask, 49:
  of 8, 25 with C * S odd: scalars), segmented large planes, NCDHW, (N, C, L), inputs inside a
  16-byte line, +-Inf and NaN;
- traffic: x read once (+ the shift values), r once, y and the mask written once; dy, x (the
  mask, r) read once, dx and grad_residual written once (tests/test_cuda_emu_traffic.py asserts it
  at the ResNet shapes as well).
"""
import numpy as np
import pytest
import torch

import emu_reference as R
from emu_testing import emu_config, emu_ops, require_emu
from test_cuda_emu_ops import CPU, EPS, SEEDS, params
from test_cuda_emu_paths import placed
from test_cuda_emu_persistent import DTYPE_PAIRS, pair_id
from test_cuda_emu_persistent_act import (ACTS, ALL4, MANY, MASKED, assert_all_bitwise, counted,
                                          mask_of, shape_id)
from test_cuda_emu_persistent_nchw import nchw_input

FWD = "persistent_nchw_kernel"
BWD = "persistent_nchw_backward_kernel"


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def fwd_args(shape, pair, act, residual, save, seed=0, offset=0):
    x = placed(shape, pair[0], offset) if offset else nchw_input(shape, pair[0], seed=seed)
    r = nchw_input(shape, pair[0], seed=seed + 5) if residual else None
    w, b = params(shape[1], pair[1])
    code, slope = ACTS[act]
    return (x, w, b, r, EPS, code, slope, save)


def bwd_args(shape, pair, act, residual, source=1, out_mask=ALL4, weight=True, offset=0):
    """act_backward's arguments from the CPU forward (training mode); source 1: the mask, 2: the
    output (the forward's y in place of x, x = nchw_input(shape, pair[0]) for the reference)."""
    x = nchw_input(shape, pair[0])
    dy = placed(shape, pair[0], offset) if offset else nchw_input(shape, pair[0], seed=1)
    r = nchw_input(shape, pair[0], seed=5) if residual else None
    w, b = params(shape[1], pair[1])
    if not weight:
        w = None
    code, slope = ACTS[act]
    y, mean, invstd, _, mask = CPU.act_forward_train(x, w, b, r, EPS, code, slope, source == 1)
    return (dy, y if source == 2 else x, r, mask if source == 1 else None, w, b, mean, invstd,
            True, code, slope, source, list(out_mask))


def run_seeds(name, *args):
    """The emulated op under each seed on these very tensors (run_emu clones them, which would
    move an input placed inside a line to an aligned one); the results bit for bit alike."""
    results = []
    for seed in SEEDS:
        with emu_config(seed=seed):
            results.append(getattr(emu_ops(), name)(*args))
    for i, (a, b) in enumerate(zip(*results)):
        R.assert_bitwise_equal(a, b, "%s output %d under seeds %s" % (name, i, SEEDS))
    return results[0]


def check_forward(args, expect_persistent=True):
    """The path, then: the statistics by the rule and (without save_mask) forward_train's bits,
    y by the rule (forward_train's bits for the identity without residual), the mask the bits of
    y and the CPU op's, two seeds alike; a streaming fallback is persistent=False's bit for
    bit."""
    x, w, b, r, eps, code, slope, save = args
    with emu_config(**MANY):
        _, ks, _ = counted("act_forward_train", *args)
        assert (ks == [FWD]) == expect_persistent, ks
        emu = run_seeds("act_forward_train", *args)
        plain = emu_ops().forward_train(x, w, b, eps)
        with emu_config(persistent=False):
            stream = emu_ops().act_forward_train(*args)
    if not expect_persistent:
        assert_all_bitwise(emu, stream, "streaming fallback")
    if not save:
        for i, nm in ((1, "mean"), (2, "invstd"), (3, "var")):
            R.assert_bitwise_equal(emu[i], plain[i], nm + " (forward_train's)")
        if code == 0 and r is None:
            R.assert_bitwise_equal(emu[0], plain[0], "y (forward_train's)")
    cpu = CPU.act_forward_train(*args)
    with np.errstate(invalid="ignore"):
        _, mean, invstd, var = R.fwd_train(x, w, b, EPS)
        y = R.act_f(R.act_z(x, w, b, r, mean, invstd), code, slope)
    for nm, e, c, ref in zip(("output", "mean", "invstd", "var"), emu, cpu, (y, mean, invstd, var)):
        R.assert_rule(nm, e, c, ref)
    if save:
        act = [k for k, v in ACTS.items() if v[0] == code][0]
        assert torch.equal(emu[4], mask_of(emu[0], act))
        assert torch.equal(emu[4], cpu[4]) or not torch.isfinite(cpu[0]).all()
    else:
        assert emu[4].numel() == 0
    return emu


# ---- the forward: the path -----------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,with_mask", [
    ((4, 8, 6, 6), torch.float32, True),       # S = 36: blocks of 2 channels
    ((3, 16, 7, 7), torch.bfloat16, True),     # S = 49: blocks of 8 channels
    ((4, 6, 7, 7), torch.float32, False),      # S = 49, C = 6: no whole blocks of 8
    ((2, 3, 5, 5), torch.float64, False),      # C * S odd (scalars), C = 3 % 8
    ((4, 8, 5, 5), torch.float64, True),       # S = 25: blocks of 8 channels
    ((2, 4, 36, 36), torch.float32, True),     # planes of 1296 values (% 8 == 0)
    ((2, 4, 35, 35), torch.float32, False),    # planes of 1225 values
    ((2, 4, 33, 33), torch.bfloat16, False),   # S = 1089 packed: blocks of 8, C = 4
    ((5, 6, 3, 4, 4), torch.float16, True),    # NCDHW, S = 48
    ((6, 8, 50), torch.float32, True),         # (N, C, L), L = 50: blocks of 4 channels
    ((6, 3, 300), torch.float32, False),       # (N, C, L), L = 300: blocks of 2, C = 3
], ids=lambda v: shape_id(v) if isinstance(v, tuple) else str(v)[6:] if "torch" in str(v)
    else str(v))
def test_forward_path_and_mask_bytes(shape, dtype, with_mask):
    """Persistent without save_mask everywhere here; with it where the mask's bytes are whole in
    every window, else the streaming path (persistent=False's bits)."""
    for save in (True, False):
        for act in ("leaky_relu", "relu"):
            args = fwd_args(shape, (dtype, dtype), act, True, save)
            check_forward(args, expect_persistent=with_mask or not save)


@pytest.mark.parametrize("offset,save,persistent", [(1, True, False), (1, False, True),
                                                    (4, True, True), (3, False, True)])
def test_forward_unaligned_input(offset, save, persistent):
    """x inside a 16-byte line: the tile's vectors at the address (partial ones at the windows'
    ends); with save_mask only where x still starts a line (offset 4 floats), else streaming."""
    args = fwd_args((4, 8, 6, 6), (torch.float32, torch.float32), "relu", True, save,
                    offset=offset)
    check_forward(args, expect_persistent=persistent)


def test_forward_residual_unaligned():
    """r at another position in its lines than x: read element-wise, the same results."""
    shape = (4, 8, 6, 6)
    x, w, b, _, eps, code, slope, save = fwd_args(shape, (torch.float32,) * 2, "silu", False,
                                                  False)
    r = placed(shape, torch.float32, 1)
    check_forward((x, w, b, r, eps, code, slope, save))


def test_forward_streaming_when_the_slab_does_not_fit():
    """(64, 2, 32, 32) float32: 256 KB of x per channel, more than one CTA holds (a channel
    is never split between slabs); 8 SMs x 2 hold it in sample ranges."""
    args = fwd_args((64, 2, 32, 32), (torch.float32, torch.float32), "relu", True, True)
    for cfg, expect in ((dict(sm_count=1, blocks_per_sm=1), False),
                        (dict(sm_count=8, blocks_per_sm=2), True)):
        with emu_config(**cfg):
            out, ks, _ = counted("act_forward_train", *args)
            with emu_config(persistent=False):
                stream = emu_ops().act_forward_train(*args)
        assert (FWD in ks) == expect and (set(ks) == {FWD}) == expect, ks
        if not expect:
            assert_all_bitwise(out, stream, "fallback")


def test_forward_eval_and_persistent_off_stream():
    x, w, b, r, eps, code, slope, save = fwd_args((4, 8, 6, 6), (torch.float32,) * 2, "relu",
                                                  True, True)
    rm, rv = torch.zeros(8), torch.ones(8)
    with emu_config(**MANY):
        _, ks, _ = counted("act_forward_eval", x, w, b, rm, rv, r, eps, code, slope, save)
        assert not any(k.startswith("persistent_") for k in ks), ks
        with emu_config(persistent=False):
            _, ks, _ = counted("act_forward_train", x, w, b, r, eps, code, slope, save)
        assert not any(k.startswith("persistent_") for k in ks), ks


# ---- the forward: every activation, dtype and shape by the rule ------------------------------

FWD_SHAPES = [(16, 16, 16, 16), (8, 24, 7, 7), (4, 8, 5, 5), (2, 4, 40, 40), (4, 6, 3, 4, 4),
              (16, 8, 50)]


def forward_cases():
    out = []
    for i, act in enumerate(ACTS):
        for j, shape in enumerate(FWD_SHAPES):
            pair = DTYPE_PAIRS[(i + 2 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 0
            out.append(pytest.param(act, shape, pair, residual, id="%s-%s-%s-%s" % (
                act, shape_id(shape), pair_id(pair), "res" if residual else "nores")))
    return out


@pytest.mark.parametrize("act,shape,pair,residual", forward_cases())
def test_forward_rule(act, shape, pair, residual):
    for save in ((True, False) if act in MASKED else (False,)):
        args = fwd_args(shape, pair, act, residual, save)
        check_forward(args)


def test_forward_several_sample_ranges():
    """(64, 2, 32, 32) float32 on 8 SMs: more than one CTA row per column (gy > 1)."""
    args = fwd_args((64, 2, 32, 32), (torch.float32, torch.float32), "relu", True, True)
    with emu_config(**MANY):
        _, ks, call = counted("act_forward_train", *args)
    assert ks == [FWD] and call.launches[0].grid[1] > 1, call.launches
    check_forward(args)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_forward_identity_is_forward_train(pair):
    """The identity without residual is forward_train bit for bit (y and the statistics)."""
    for shape in ((4, 8, 6, 6), (2, 4, 40, 40)):
        check_forward(fwd_args(shape, pair, "identity", False, False))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
def test_forward_nonfinite(act):
    shape = (4, 16, 6, 6)
    save = act in MASKED
    args = list(fwd_args(shape, (torch.float32, torch.float32), act, True, save))
    args[0][1, 2, 3, 4] = float("inf")
    args[0][2, 5, 1, 1] = float("nan")
    args[3][0, 3, 0, 0] = float("-inf")
    args[3][3, 6, 2, 2] = float("nan")
    with emu_config(**MANY):
        emu = run_seeds("act_forward_train", *args)
        with emu_config(persistent=False):
            stream = emu_ops().act_forward_train(*args)
    for i in range(4):
        assert torch.equal(torch.isnan(emu[i]), torch.isnan(stream[i])), i
        assert torch.equal(torch.isinf(emu[i]), torch.isinf(stream[i])), i
    check_forward(tuple(args))


# ---- the backward from the mask -------------------------------------------------------------

def check_backward(args, expect_persistent=True, same_plan=True):
    """The path, then: grad_residual the streaming path's bits, dx, dweight, dbias backward's
    persistent results on that dz bit for bit (when asked for: dz is then an output; same_plan:
    dz, a fresh tensor, sits in its lines as dy does, so backward plans the same vectors), all
    by the rule against the CPU op and the long-double reference, two seeds alike."""
    dy, x, r, mask, w, b, mean, invstd, train, code, slope, source, om = args
    if source == 2:  # the reference from x, not from the y the op recovers x_hat from
        x = nchw_input(tuple(x.shape), x.dtype)
    with emu_config(**MANY):
        _, ks, _ = counted("act_backward", *args)
        assert (ks == [BWD]) == expect_persistent, ks
        emu = run_seeds("act_backward", *args)
        with emu_config(persistent=False):
            stream = emu_ops().act_backward(*args)
        # (the output source's sums and map run on x_hat / invstd recovered from y, not on x)
        if om[3] and om[0] and same_plan and source != 2:
            plain = emu_ops().backward(emu[3], x, w, mean, invstd, True, om[:3])
            for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias")):
                if om[i]:
                    R.assert_bitwise_equal(emu[i], plain[i], nm + " (backward's on dz)")
    if not expect_persistent:
        assert_all_bitwise(emu, stream, "streaming fallback")
    if om[3]:
        R.assert_bitwise_equal(emu[3], stream[3], "grad_residual")
    cpu = CPU.act_backward(*args)
    with np.errstate(invalid="ignore"):
        z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
        dz = R.act_grad(z, R.ld(dy), code, slope)
        ref = R.bwd(torch.from_numpy(dz.astype(np.float64)), x, w, mean, invstd, True) + (dz,)
    for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias", "grad_residual")):
        assert (emu[i].numel() > 0) == om[i], nm
        if om[i]:
            R.assert_rule(nm, emu[i], cpu[i], ref[i])
    return emu


BWD_SHAPES = [(8, 16, 16, 16), (8, 24, 7, 7), (4, 8, 5, 5), (2, 4, 40, 40), (3, 6, 3, 4, 4),
              (16, 8, 50)]
OUT_MASKS = [ALL4, [True, False, False, True], [True, True, True, False],
             [True, False, True, False]]


BWD_COMBOS = [(1, "relu"), (1, "leaky_relu"), (0, "silu"), (0, "gelu_tanh"), (0, "relu"),
              (0, "leaky_relu"), (2, "leaky_relu"), (2, "identity")]


def backward_cases():
    out = []
    for i, (source, act) in enumerate(BWD_COMBOS):
        for j, shape in enumerate(BWD_SHAPES):
            pair = DTYPE_PAIRS[(i + 2 * j) % len(DTYPE_PAIRS)]
            residual = (i + j) % 2 == 0
            weight = (i + j) % 3 != 2
            om = OUT_MASKS[(i + j) % len(OUT_MASKS)]
            out.append(pytest.param(
                source, act, shape, pair, residual, weight, om,
                id="src%d-%s-%s-%s-%s-%s-%s" % (
                    source, act, shape_id(shape), pair_id(pair), "res" if residual else "nores",
                    "w" if weight else "now", "".join("1" if v else "0" for v in om))))
    return out


@pytest.mark.parametrize("source,act,shape,pair,residual,weight,out_mask", backward_cases())
def test_backward(source, act, shape, pair, residual, weight, out_mask):
    check_backward(bwd_args(shape, pair, act, residual, source, out_mask, weight))


@pytest.mark.parametrize("source,act", [(1, "relu"), (0, "silu")])
def test_backward_several_sample_ranges(source, act):
    """(64, 2, 32, 32) float32 on 8 SMs: more than one CTA row per column (gy > 1)."""
    args = bwd_args((64, 2, 32, 32), (torch.float32, torch.float32), act, True, source)
    with emu_config(**MANY):
        _, ks, call = counted("act_backward", *args)
    assert ks == [BWD] and call.launches[0].grid[1] > 1, call.launches
    check_backward(args)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("source,act", [(1, "leaky_relu"), (0, "gelu_tanh"), (2, "leaky_relu")])
def test_backward_every_dtype_bitwise_on_dz(pair, source, act):
    for shape in ((4, 8, 6, 6), (2, 4, 40, 40)):
        check_backward(bwd_args(shape, pair, act, True, source))


@pytest.mark.parametrize("source,act", [(1, "relu"), (0, "silu"), (2, "leaky_relu")])
@pytest.mark.parametrize("offset", [1, 3])
def test_backward_unaligned_dy(offset, source, act):
    """dy inside a 16-byte line (x aligned): scalar vectors, the mask bits of each element read
    from the bytes they sit in."""
    check_backward(bwd_args((4, 8, 6, 6), (torch.float32,) * 2, act, True, source,
                            offset=offset), same_plan=False)


@pytest.mark.parametrize("source,act", [(0, "silu"), (0, "leaky_relu"), (2, "leaky_relu")])
def test_backward_residual_unaligned(source, act):
    """The input and output sources with r at another position in its lines than dy and x (y):
    r read element-wise, the same results."""
    args = list(bwd_args((4, 8, 6, 6), (torch.float32,) * 2, act, True, source))
    args[2] = placed(args[2].shape, torch.float32, 1)
    args[2].copy_(nchw_input(args[2].shape, torch.float32, seed=5))
    check_backward(tuple(args))


@pytest.mark.parametrize("source,act,train,out_mask", [
    (1, "relu", False, ALL4),                        # eval mode
    (0, "silu", False, ALL4),
    (2, "leaky_relu", False, ALL4),
    (1, "relu", True, [False, True, True, True]),    # no grad_input
    (0, "gelu_tanh", True, [False, True, True, False]),
    (2, "identity", True, [False, True, True, True]),
])
def test_backward_streaming_paths(source, act, train, out_mask):
    """Eval mode (its reduction writes dx) and no grad_input have no persistent path."""
    args = list(bwd_args((4, 32, 6, 6), (torch.float32,) * 2, act, True, source, out_mask))
    args[8] = train
    with emu_config(**MANY):
        _, ks, _ = counted("act_backward", *args)
    assert not any(k.startswith("persistent_") for k in ks), ks


def test_backward_streaming_when_the_tiles_do_not_fit():
    """(64, 2, 32, 32) float32: 512 KB of dy and x per channel, more than one CTA holds;
    16 SMs x 1 hold it in sample ranges."""
    args = bwd_args((64, 2, 32, 32), (torch.float32, torch.float32), "relu", True)
    for cfg, expect in ((dict(sm_count=1, blocks_per_sm=1), False),
                        (dict(sm_count=16, blocks_per_sm=1), True)):
        with emu_config(**cfg):
            out, ks, _ = counted("act_backward", *args)
            with emu_config(persistent=False):
                stream = emu_ops().act_backward(*args)
        assert (BWD in ks) == expect and (set(ks) == {BWD}) == expect, ks
        if not expect:
            assert_all_bitwise(out, stream, "fallback")


@pytest.mark.parametrize("source,act", [(1, "leaky_relu"), (0, "silu"), (2, "leaky_relu")])
def test_backward_nonfinite(source, act):
    shape = (4, 16, 6, 6)
    args = list(bwd_args(shape, (torch.float32, torch.float32), act, True, source))
    args[0][0, 3, 0, 0] = float("-inf")
    args[0][3, 6, 2, 2] = float("nan")
    emu = check_backward(tuple(args))
    assert not torch.isfinite(emu[0]).all()


# ---- traffic --------------------------------------------------------------------------------

TRAFFIC_SHAPES = [(2, 128, 14, 14), (2, 32, 56, 56), (2, 256, 7, 7)]  # packed, planes, 7x7

@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("shape", TRAFFIC_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_traffic(dtype, shape, residual):
    """x read once (+ C * (gy + 1) shift values), r read once, y written once, the mask written
    once (numel / 8 bytes, never read); every bulk access within 1.1x of the ideal sectors."""
    args = fwd_args(shape, (dtype, dtype), "relu", residual, True)
    x = args[0]
    C = shape[1]
    xbytes = x.numel() * x.element_size()
    with emu_config(**MANY):
        _, ks, call = counted("act_forward_train", *args)
    assert ks == [FWD], ks
    gy = call.launches[0].grid[1]
    table = call.table(xbytes)
    assert call.read("input") == xbytes + C * (gy + 1) * x.element_size(), table
    assert call.read("residual") == (xbytes if residual else 0), table
    assert call.written("output") == xbytes and call.read("output") == 0, table
    assert call.written("mask") == x.numel() // 8 and call.read("mask") == 0, table
    for l in call.launches:
        for t in l.tensors.values():
            if t.size >= xbytes // 2:
                for d in (t.read, t.write):
                    assert not d.accesses or d.sector_ratio <= 1.1, table


@pytest.mark.parametrize("source,act,residual", [(1, "relu", False), (0, "silu", True),
                                                 (2, "leaky_relu", True)])
@pytest.mark.parametrize("shape", TRAFFIC_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_traffic(dtype, shape, source, act, residual):
    """dy, x (r) read once, the mask once (one byte per vector; the partial vectors at a
    window's ends may ask two), dx and grad_residual written once."""
    args = bwd_args(shape, (dtype, dtype), act, residual, source)
    x = args[1]
    xbytes = x.numel() * x.element_size()
    with emu_config(**MANY):
        _, ks, call = counted("act_backward", *args)
    assert set(ks) == {BWD}, ks
    table = call.table(xbytes)
    assert call.read("grad_output") == xbytes and call.read("saved") == xbytes, table
    assert call.written("grad_input") == xbytes and call.written("grad_residual") == xbytes, table
    assert call.read("grad_input") == 0 and call.read("grad_residual") == 0, table
    assert call.read("residual") == (xbytes if residual else 0), table
    V = 16 // x.element_size()
    windows = shape[0] * shape[1]
    if source == 1:
        assert x.numel() // V <= call.read("mask") <= x.numel() // V + windows, table
    assert call.total(big=xbytes // 2) == (4 + residual) * xbytes, table
