"""The kernel paths of issue 15 (items 1, 4, 5, 6) under the CUDA emulation, against the CPU op and
the long-double reference (tests/emu_reference.py's rule), each under two seeds bit for bit:

- unaligned heads: inputs that start inside a 16-byte line (storage offsets of 1..7 elements)
  keep 16-byte vectors in the contiguous kernels (the statistics kernels mask the elements before
  the first boundary, the element-wise pass peels them); inputs at the same position and at
  different positions (dy aligned, x not: scalar), the fresh output always aligned (element-wise
  stores);
- channels_last with C not a multiple of the 16-byte vector: the widest vector that tiles C
  (C % 4 == 2 float32: 8 bytes; C odd: scalar; half C % 8 == 4: 8 bytes), also offset inputs;
- the rows kernel's lane layouts (TX = C/V of 1, 3, 5, 9, 17, 33, ... lanes along channels: 32 / TX
  rows per warp, idle lanes, several CTA columns) and its splits, under SM counts and occupancies;
- the planes kernel's short segments (1-2k values: two samples per iteration) with N odd;
- the element-wise pass's backward walk: its output does not depend on the grid (the SM count,
  the occupancy), bit for bit;
- the act backward from a saved mask, training and eval mode, with misaligned inputs (its mask
  bits read per vector group);
- the backward in eval mode with the sums asked for, whose reduction writes dx: the same values as
  the dx-only pass.
"""
import pytest
import torch

import emu_reference as R
from bn_testing import random_values
from emu_testing import emu_config, emu_ops, require_emu
from test_cuda_emu_ops import CPU, EPS, check_backward, check_forward_train, params, run_emu


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def placed(shape, dtype, offset=0, channels_last=False, scale=1.0, shift=0.0):
    """A tensor of random values whose data starts `offset` elements into a fresh (64-byte
    aligned) buffer of NaN, contiguous or channels-last (any rank >= 3)."""
    v = random_values(shape, scale=scale) + shift
    n = v.numel()
    flat = torch.full((n + offset,), float("nan"), dtype=dtype)[offset:]
    if channels_last:
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        x = flat.view(tuple(shape[i] for i in perm)).permute(
            0, len(shape) - 1, *range(1, len(shape) - 1))
    else:
        x = flat.view(shape)
    x.copy_(v.to(dtype))
    assert (x.data_ptr() % 16 == 0) == (offset * x.element_size() % 16 == 0)
    return x


def eval_params(C, pdtype=torch.float32):
    w, b = params(C, pdtype)
    rm = torch.randn(C, dtype=torch.float64).to(pdtype)
    rv = (0.5 + torch.rand(C, dtype=torch.float64)).to(pdtype)
    return w, b, rm, rv


def check_eval(x, w, b, rm, rv):
    emu = run_emu("forward_eval", x, w, b, rm, rv, EPS)
    R.assert_rule("output", emu, CPU.forward_eval(x, w, b, rm, rv, EPS),
                  R.fwd_eval(x, w, b, rm, rv, EPS))
    return emu


def check_all(x, dy, pdtype=torch.float32):
    """forward_train, forward_eval, backward (train, eval) under the rule."""
    w, b = params(x.shape[1], pdtype)
    check_forward_train(x, w, b)
    check_eval(x, *eval_params(x.shape[1], pdtype))
    check_backward(x, dy, w, True, (True, True, True))
    check_backward(x, dy, w, False, (True, False, True))


# ---- unaligned heads (contiguous) ---------------------------------------------------------------

# Shapes of each contiguous pass-1 kernel: planes (S >= 256 vectors), packed (C*S % V == 0, and
# not: scalar), (N, C) rows, one sample.
HEAD_SHAPES = [(2, 3, 40, 40), (4, 8, 5, 5), (4, 3, 7, 7), (8, 12), (1, 2, 33, 35)]
HEAD_CASES = [(torch.float32, 1), (torch.float32, 2), (torch.float32, 3),
              (torch.float16, 1), (torch.bfloat16, 5), (torch.float16, 7), (torch.float64, 1)]


@pytest.mark.parametrize("dtype,offset", HEAD_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, int)
                         else "off%d" % v)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_unaligned_head_same_position(shape, dtype, offset):
    """x and dy start at the same position in their 16-byte lines; the outputs are fresh
    (aligned): vectors follow the inputs, the outputs are stored element-wise."""
    x = placed(shape, dtype, offset)
    dy = placed(shape, dtype, offset)
    check_all(x, dy)


@pytest.mark.parametrize("dy_offset,x_offset", [(0, 1), (1, 0), (1, 2), (3, 1)])
@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (4, 8, 5, 5), (8, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_unaligned_head_different_positions(shape, dy_offset, x_offset):
    """dy and x at different positions in their lines: the two-input passes go scalar."""
    x = placed(shape, torch.float32, x_offset)
    dy = placed(shape, torch.float32, dy_offset)
    check_all(x, dy)


@pytest.mark.parametrize("shape,dtype,offset", [((1, 2), torch.float32, 1),           # all head
                                                ((2, 1, 1, 1), torch.float32, 3),
                                                ((1, 3, 1, 2), torch.float16, 5),
                                                ((2, 2, 70, 70), torch.float32, 1),     # 2 segments
                                                ((2, 2, 70, 70), torch.bfloat16, 3)])
def test_unaligned_head_edges(shape, dtype, offset):
    """Tensors shorter than the peeled head; planes cut into segments, each with its own head."""
    x = placed(shape, dtype, offset)
    dy = placed(shape, dtype, offset)
    check_all(x, dy)


def test_unaligned_head_with_large_mean_and_inf():
    """The shifted Welford (first value of the channel) and the +-Inf merge with an offset input
    that keeps its vectors."""
    x = placed((4, 8, 5, 5), torch.float32, 1, scale=1e-2, shift=1e4)
    check_forward_train(x, *params(8, torch.float32))
    x = placed((2, 3, 40, 40), torch.float32, 3)
    x[1, 1, 3, 5] = float("inf")
    check_forward_train(x, *params(3, torch.float32))


# ---- channels_last: the widest vector that tiles C ----------------------------------------------

CL_CASES = [
    (torch.float32, 6, 0),     # C % 4 == 2: 8-byte vectors
    (torch.float32, 10, 0),
    (torch.float32, 6, 2),     # offset 8 bytes: still 8-byte vectors
    (torch.float32, 6, 1),     # offset 4 bytes: scalar
    (torch.float32, 7, 0),     # C odd: scalar
    (torch.float16, 12, 0),    # C % 8 == 4: 8-byte vectors
    (torch.bfloat16, 6, 0),    # C % 8 == 6: 4-byte vectors
    (torch.float16, 5, 0),     # C odd: scalar
    (torch.float16, 20, 4),    # offset 8 bytes, 8-byte vectors
    (torch.float64, 3, 0),
    (torch.float64, 6, 1),     # offset 8 bytes: scalar for double
]


@pytest.mark.parametrize("dtype,C,offset", CL_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, int)
                         else str(v))
def test_channels_last_widest_vector(dtype, C, offset):
    shape = (3, C, 5, 7)
    x = placed(shape, dtype, offset, channels_last=True)
    dy = placed(shape, dtype, offset, channels_last=True)
    check_all(x, dy)


def test_channels_last_inputs_aligned_differently():
    """dy 16-byte aligned, x 8 bytes off: the widest vector both allow (8 bytes for C = 12)."""
    x = placed((3, 12, 5, 7), torch.float32, 2, channels_last=True)
    dy = placed((3, 12, 5, 7), torch.float32, 0, channels_last=True)
    check_all(x, dy)


# ---- the rows kernel: lanes along channels, rows per warp, splits -------------------------------

# float32 (V = 4): C / 4 channel vectors = 1, 3, 5, 9, 17, 33, 64 -> TX = 1, 3, 5, 9, 9, 8, 32.
ROWS_C = [4, 12, 20, 36, 68, 132, 256, 2, 1]


@pytest.mark.parametrize("C", ROWS_C)
def test_rows_lane_layouts(C):
    x = placed((16, C, 4, 4), torch.float32, 0, channels_last=True)
    dy = placed((16, C, 4, 4), torch.float32, 0, channels_last=True)
    check_all(x, dy)


@pytest.mark.parametrize("sms,bps", [(132, 0), (4, 1), (1, 1), (132, 32)])
@pytest.mark.parametrize("shape,cl", [((64, 12, 8, 8), True), ((2048, 20), False),
                                      ((8, 36, 9, 9), True)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("cl" if v else "nc"))
def test_rows_splits(shape, cl, sms, bps):
    """Many rows: the splits interleave chunks of rows; every SM count and occupancy."""
    x = placed(shape, torch.float32, 0, channels_last=cl)
    dy = placed(shape, torch.float32, 0, channels_last=cl)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=sms, blocks_per_sm=bps):
        check_forward_train(x, w, b)
        check_backward(x, dy, w, True, (True, True, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rows_half_wide_vectors(dtype):
    """V = 8 half channels per lane, C / 8 = 3 and 16 vectors."""
    for C in (24, 128):
        x = placed((8, C, 5, 5), dtype, 0, channels_last=True)
        dy = placed((8, C, 5, 5), dtype, 0, channels_last=True)
        check_all(x, dy)


# ---- the planes kernel: short segments, several samples per iteration ---------------------------

@pytest.mark.parametrize("shape,offset", [((5, 3, 32, 40), 0),    # S = 1280: 2 samples / iteration
                                          ((5, 2, 32, 40), 1),    # the same, unaligned head
                                          ((3, 2, 48, 60), 0),    # S = 2880: 3 slots, 1 sample
                                          ((7, 1, 32, 32), 0)])   # S = 1024
def test_planes_short_segments(shape, offset):
    x = placed(shape, torch.float32, offset)
    dy = placed(shape, torch.float32, offset)
    w, b = params(shape[1], torch.float32)
    for sms, bps in ((132, 0), (2, 1)):
        with emu_config(sm_count=sms, blocks_per_sm=bps):
            check_forward_train(x, w, b)
            check_backward(x, dy, w, True, (True, True, True))


# ---- eval backward: dx written by the reduction ---------------------------------------------------

@pytest.mark.parametrize("shape,dtype,offset,cl", [
    ((2, 3, 40, 40), torch.float32, 0, False),    # planes
    ((2, 3, 40, 40), torch.bfloat16, 3, False),   # planes, unaligned head: dx stored element-wise
    ((3, 2, 70, 70), torch.float32, 1, False),    # planes, 2 segments
    ((4, 8, 5, 5), torch.float16, 0, False),      # packed, vectors across planes
    ((4, 3, 7, 7), torch.float32, 2, False),      # packed, scalar (C*S odd)
    ((64, 12), torch.float64, 0, False),          # (N, C) rows
    ((16, 6, 9, 9), torch.float32, 0, True),      # channels_last, 8-byte vectors
    ((16, 32, 5, 5), torch.bfloat16, 1, True)])   # channels_last, offset: scalar
def test_eval_backward_dx_from_the_reduction(shape, dtype, offset, cl):
    """In eval mode with grad_weight / grad_bias asked for, pass 1 writes dx = dy * w * invstd
    as it reads dy (bn_backward.cu EvalGradOp): the same bits as the dx-only path's element-wise
    pass, whatever the grid (equal values: the element-wise pass's affine map adds +0, which
    turns a -0 product into +0; the reduction stores dy * a as torch does), and under the rule."""
    x = placed(shape, dtype, offset, channels_last=cl)
    dy = placed(shape, dtype, offset, channels_last=cl)
    C = shape[1]
    w = params(C, torch.float32)[0]
    mean, invstd = CPU.forward_train(x, w, None, EPS)[1:3]
    mean, invstd = torch.randn_like(mean), 0.5 + torch.rand_like(invstd)
    ops = emu_ops()
    ref = R.bwd(dy, x, w, mean, invstd, False)
    dx_only = ops.backward(dy, x, w, mean, invstd, False, [True, False, False])[0]
    for sms, bps in ((132, 0), (1, 1), (3, 1)):
        with emu_config(sm_count=sms, blocks_per_sm=bps):
            for mask in ([True, True, True], [True, False, True], [True, True, False]):
                out = ops.backward(dy, x, w, mean, invstd, False, mask)
                assert torch.equal(dx_only, out[0]), "eval dx with the sums: %s" % mask
                for i, nm in ((1, "grad_weight"), (2, "grad_bias")):
                    if mask[i]:
                        R.assert_rule(nm, out[i], CPU.backward(dy, x, w, mean, invstd, False,
                                                               mask)[i], ref[i])
    R.assert_rule("grad_input", dx_only,
                  CPU.backward(dy, x, w, mean, invstd, False, [True, False, False])[0], ref[0])


# ---- the element-wise pass walks backwards: independent of the grid -----------------------------

# Sizes that take a one-CTA grid several iterations (2048 float32 elements per contiguous
# iteration, 4 * TY rows per channels_last one).
@pytest.mark.parametrize("shape,offset,cl", [((4, 3, 33, 35), 0, False), ((4, 3, 33, 35), 1, False),
                                             ((3, 5, 17, 19), 3, False), ((5, 1000), 0, False),
                                             ((2, 3, 7, 7), 2, False), ((16, 6, 9, 9), 0, True),
                                             ((16, 32, 5, 5), 1, True)])
def test_elementwise_pass_independent_of_grid(shape, offset, cl):
    """forward_eval is the element-wise pass alone: its bits must not depend on how many CTAs
    the grid has (one with many grid iterations walked backwards, a few, a full wave)."""
    x = placed(shape, torch.float32, offset, channels_last=cl)
    p = eval_params(shape[1])
    outs = []
    for sms, bps in ((132, 0), (1, 1), (3, 1)):
        with emu_config(sm_count=sms, blocks_per_sm=bps):
            outs.append(check_eval(x, *p))
    for o in outs[1:]:
        R.assert_bitwise_equal(outs[0], o, "forward_eval under different grids")


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 0), (torch.float32, 1),
                                          (torch.float32, 3), (torch.bfloat16, 0),
                                          (torch.bfloat16, 3), (torch.bfloat16, 7)],
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, int)
                         else "off%d" % v)
@pytest.mark.parametrize("shape,cl", [((2, 3, 17, 19), False), ((4, 8, 7, 7), False),
                                      ((3, 5, 40, 40), False), ((4, 16, 5, 5), True)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("cl" if v else "nchw"))
def test_act_backward_mask(shape, cl, dtype, offset):
    """The act backward from a saved mask, training and eval mode (eval with dx and the sums: the
    reduction writes dx and grad_residual, bn_reduce_ops.cuh EvalDxOp), every kernel shape, with
    dy and x at the same position inside their 16-byte lines: the reduction keeps its vectors, so
    a vector group starts at an element index that is not a multiple of the width and its mask
    bits span two bytes of the packed mask; the fresh outputs are then stored element-wise."""
    relu, slope = 1, 0.0  # act 1: ReLU, whose backward reads the saved sign mask
    x = placed(shape, dtype, offset, channels_last=cl)
    dy = placed(shape, dtype, offset, channels_last=cl)
    w, b = params(shape[1], torch.float32)
    _, mean, invstd, _, mask = CPU.act_forward_train(x, w, b, None, EPS, relu, slope, True)
    for train in (True, False):
        if not train:  # the mask of an eval forward with the statistics the backward gets
            mean, invstd = torch.randn(shape[1]), 0.5 + torch.rand(shape[1])
            mask = CPU.act_forward_eval(x, w, b, mean, 1 / invstd ** 2 - EPS, None, EPS, relu,
                                        slope, True)[1]
        z = R.act_z(x, w, b, None, R.ld(mean), R.ld(invstd))
        dz = torch.from_numpy(R.act_grad(z, R.ld(dy), relu, slope).astype(R.np.float64))
        dx, dw, db = R.bwd(dz, x, w, mean, invstd, train)
        for out_mask in ([True, True, True, False], [True, True, True, True],
                         [True, False, True, True], [True, False, False, True]):
            args = (dy, x, None, mask, w, b, mean, invstd, train, relu, slope, 1, out_mask)
            emu = run_emu("act_backward", *args)
            cpu = CPU.act_backward(*args)
            for i, (name, ref) in enumerate(zip(("grad_input", "grad_weight", "grad_bias",
                                                 "grad_residual"), (dx, dw, db, dz))):
                if out_mask[i]:
                    R.assert_rule("%s (train %s, mask %s)" % (name, train, out_mask), emu[i],
                                  cpu[i], ref)
                else:
                    assert emu[i].numel() == 0, name


# ---- the act backward that recomputes dz (input and output sources) -----------------------------

# (activation, negative_slope, source): the input source for every activation but identity (whose
# dz is dy), the output source (memory-saving) for the invertible ones.
RECOMPUTED = [(3, 0.0, 0), (4, 0.0, 0), (1, 0.0, 0), (2, 0.1, 0), (2, 0.1, 2), (0, 0.0, 2)]


@pytest.mark.parametrize("act,slope,source", RECOMPUTED,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("shape,cl,r_offset", [((2, 3, 40, 40), False, None),   # planes
                                               ((4, 8, 7, 7), False, 0),        # packed
                                               ((3, 12, 5, 7), True, 0),        # rows
                                               ((8, 12), False, None),
                                               ((2, 2, 33, 35), False, 1)],     # r 4 B off: scalar
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_act_backward_recomputed(act, slope, source, shape, cl, r_offset):
    """The input and output sources form dz (and x_hat / invstd) where the reduction and the dx
    pass read dy and x (y), and write dz only as grad_residual: training and eval mode, every
    output mask, with and without a residual (one at another position in its 16-byte lines than
    dy and x: the scalar kernels), against the CPU op and the long-double reference."""
    x = placed(shape, torch.float32, 0, channels_last=cl)
    dy = placed(shape, torch.float32, 0, channels_last=cl)
    r = None if r_offset is None else placed(shape, torch.float32, r_offset, channels_last=cl)
    w, b = params(shape[1], torch.float32)
    y, mean, invstd, _, _ = CPU.act_forward_train(x, w, b, r, EPS, act, slope, False)
    saved = y if source == 2 else x
    for train in (True, False):
        if not train:
            mean, invstd = torch.randn(shape[1]), 0.5 + torch.rand(shape[1])
            # the output source recovers x_hat with the statistics it is given: y from them
            y = CPU.act_forward_eval(x, w, b, mean, 1 / invstd ** 2 - EPS, r, EPS, act, slope,
                                     False)[0]
            saved = y if source == 2 else x
        z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
        dz = torch.from_numpy(R.act_grad(z, R.ld(dy), act, slope).astype(R.np.float64))
        dx, dw, db = R.bwd(dz, x, w, mean, invstd, train)
        for out_mask in ([True, True, True, False], [True, False, False, True],
                         [False, True, True, True]):
            args = (dy, saved, r, None, w, b, mean, invstd, train, act, slope, source, out_mask)
            emu = run_emu("act_backward", *args)
            cpu = CPU.act_backward(*args)
            for i, (name, ref) in enumerate(zip(("grad_input", "grad_weight", "grad_bias",
                                                 "grad_residual"), (dx, dw, db, dz))):
                if out_mask[i]:
                    R.assert_rule("%s (train %s)" % (name, train), emu[i], cpu[i], ref)
                else:
                    assert emu[i].numel() == 0, name


@pytest.mark.parametrize("act,slope,source", [(3, 0.0, 0), (4, 0.0, 0), (2, 0.1, 0), (2, 0.1, 2),
                                              (0, 0.0, 2)], ids=str)
@pytest.mark.parametrize("shape,dtype,offset,cl,residual", [
    ((2, 3, 40, 40), torch.float32, 0, False, True),     # planes
    ((2, 3, 40, 40), torch.bfloat16, 3, False, False),   # planes, unaligned head
    ((3, 2, 70, 70), torch.float16, 0, False, True),     # planes, 2 segments
    ((4, 8, 5, 5), torch.float16, 0, False, True),       # packed, vectors across planes
    ((4, 3, 7, 7), torch.float32, 2, False, False),      # packed, scalar (C*S odd)
    ((64, 12), torch.float64, 0, False, True),           # (N, C) rows
    ((16, 6, 9, 9), torch.float32, 0, True, True),       # channels_last, 8-byte vectors
    ((16, 32, 5, 5), torch.bfloat16, 1, True, False)],   # channels_last, offset: scalar
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_act_backward_eval_dx_from_the_reduction(act, slope, source, shape, dtype, offset, cl,
                                                 residual):
    """The input and output sources in eval mode with dx and grad_weight / grad_bias asked for:
    pass 1 forms dz from dy, x (y) and r and writes dx = dz * w * invstd (and dz as
    grad_residual) as it reads them (bn_act_backward.cu EvalInputDxOp, EvalOutputDxOp, which
    also recovers x_hat / invstd from y for the sums): dx and grad_residual the same bits as the
    passes without the sums (the element-wise DxFromInputFn / DxFromOutputFn, GradFromInputFn /
    RecoverFn), whatever the grid; grad_weight and grad_bias under the rule."""
    x = placed(shape, dtype, offset, channels_last=cl)
    dy = placed(shape, dtype, offset, channels_last=cl)
    r = placed(shape, dtype, offset, channels_last=cl) if residual else None
    C = shape[1]
    w, b = params(C, torch.float32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # the saved statistics' dtype
    mean, invstd = torch.randn(C, dtype=acc), 0.5 + torch.rand(C, dtype=acc)
    saved = x
    if source == 2:  # y of an eval forward with the statistics the backward gets
        y = CPU.act_forward_eval(x, w, b, mean, 1 / invstd ** 2 - EPS, r, EPS, act, slope,
                                 False)[0]
        saved = placed(shape, dtype, offset, channels_last=cl)
        saved.copy_(y)
    ops = emu_ops()

    def call(out_mask):
        return ops.act_backward(dy, saved, r, None, w, b, mean, invstd, False, act, slope, source,
                                out_mask)

    dx_only = call([True, False, False, False])[0]
    dz_only = call([False, False, False, True])[3]
    z = R.act_z(x, w, b, r, R.ld(mean), R.ld(invstd))
    dz = torch.from_numpy(R.act_grad(z, R.ld(dy), act, slope).astype(R.np.float64))
    ref = R.bwd(dz, x, w, mean, invstd, False)
    for sms, bps in ((132, 0), (1, 1), (3, 1)):
        with emu_config(sm_count=sms, blocks_per_sm=bps):
            for mask in ([True, True, True, False], [True, False, True, True],
                         [True, True, False, True]):
                out = call(mask)
                assert torch.equal(dx_only, out[0]), "eval dx with the sums: %s" % mask
                if mask[3]:
                    assert torch.equal(dz_only, out[3]), "grad_residual with the sums: %s" % mask
                cpu = CPU.act_backward(dy, saved, r, None, w, b, mean, invstd, False, act, slope,
                                       source, mask)
                for i, nm in ((1, "grad_weight"), (2, "grad_bias")):
                    if mask[i]:
                        R.assert_rule(nm, out[i], cpu[i], ref[i])
    cpu = CPU.act_backward(dy, saved, r, None, w, b, mean, invstd, False, act, slope, source,
                           [True, False, False, True])
    R.assert_rule("grad_input", dx_only, cpu[0], ref[0])
    R.assert_rule("grad_residual", dz_only, cpu[3], dz)
