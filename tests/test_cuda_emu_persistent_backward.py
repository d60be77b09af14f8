"""The persistent single-read training backward (issue 15; csrc/cuda/bn_persistent_backward.cuh)
under the CUDA emulation: a cooperative launch per slab of channel columns whose CTAs hold their
tiles of dy and x in shared memory across two grid barriers.

- which path backward takes: persistent for the rows layout (channels_last 2-D / 3-D, (N, C)) in
  training mode with grad_input asked for, where the slab's two tiles fit the co-resident CTAs;
  the streaming launches (reduction, merge, dx pass) where they do not (an SM count and occupancy
  too small -- also where the forward's single tile still fits), when the persistent paths are
  turned off, in eval mode, and without grad_input (the reduction alone); NCHW takes the
  contiguous layout's kernel (tests/test_cuda_emu_persistent_nchw_backward.py);
- the persistent results against the CPU op and the long-double reference (the rule of
  tests/emu_reference.py, as tests/test_cuda_emu_ops.py), every dtype pair, weight None, the
  output masks, odd channel counts (narrow vectors, idle lanes), several slabs, large means,
  +-Inf and NaN, under two seeds bit for bit (the emulator shuffles the order of the CTAs in every
  round between grid barriers); persistent and streaming on one input both within the rule;
- traffic: dy read once, x read once, dx written once, and exactly the per-channel extras the
  kernel's header states; every bulk access within 1.1x of the ideal sectors.
"""
import numpy as np
import pytest
import torch

import emu_reference as R
from emu_testing import emu_config, emu_ops, require_emu, traffic
from test_cuda_emu_ops import CPU, EPS, check_backward, params
from test_cuda_emu_persistent import DTYPE_PAIRS, pair_id, rows_input

PERSISTENT = "persistent_rows_backward_kernel"
STREAMING_CL = ["reduce_rows_kernel", "merge_partials_kernel", "ew_rows_kernel"]
ALL = [True, True, True]


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def saved_stats(x, w):
    return CPU.forward_train(x, w, None, EPS)[1:3]


def backward_call(dy, x, w, train=True, mask=ALL):
    """The emulated backward once under the traffic counter: (kernel names, OpTraffic)."""
    mean, invstd = saved_stats(x, w)
    with traffic() as t:
        emu_ops().backward(dy, x, w, mean, invstd, train, list(mask))
    assert len(t.calls) == 1
    return t.calls[0].kernels(), t.calls[0]


def shape_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ---- the path taken ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,cl", [((4, 32, 6, 6), True), ((300, 24), False),
                                      ((2, 8, 3, 4, 5), True)], ids=shape_id)
def test_rows_layout_takes_the_persistent_path(shape, cl):
    x, dy = rows_input(shape, torch.float32, cl), rows_input(shape, torch.float32, cl, seed=1)
    w, _ = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = backward_call(dy, x, w)
        assert ks == [PERSISTENT], ks
        with emu_config(persistent=False):
            ks, _ = backward_call(dy, x, w)
        assert ks == STREAMING_CL, ks


def check_fallback(dy, x, w, kernel, streaming, refused, forward_kernel, fits):
    """The streaming launches on each (SM count, blocks per SM) of refused, where the forward's
    single tile still fits the last of them (forward_kernel runs, in one slab or more); the
    persistent kernel on fits, within the rule. Returns its OpTraffic."""
    for sms, bps in refused:
        with emu_config(sm_count=sms, blocks_per_sm=bps):
            ks, _ = backward_call(dy, x, w)
        assert ks == streaming, (sms, bps, ks)
    with emu_config(sm_count=refused[-1][0], blocks_per_sm=refused[-1][1]), traffic() as t:
        emu_ops().forward_train(x, w, None, EPS)
    assert set(t.calls[0].kernels()) == {forward_kernel}, t.calls[0].kernels()
    with emu_config(sm_count=fits[0], blocks_per_sm=fits[1]):
        ks, call = backward_call(dy, x, w)
        assert ks == [kernel], ks
        check_backward(x, dy, w, True, ALL)
    return call


def test_streaming_when_the_tiles_do_not_fit():
    """dy and x of (8, 128, 16, 16) float32 are 2 MB: more than one co-resident CTA of at most
    227 KB holds, and more than 4 SMs x 2 (8 x 227 KB, where the forward's 1 MB tile of x fits);
    16 SMs x 1 hold them."""
    shape = (8, 128, 16, 16)
    x, dy = rows_input(shape, torch.float32), rows_input(shape, torch.float32, seed=1)
    w, _ = params(128, torch.float32)
    check_fallback(dy, x, w, PERSISTENT, STREAMING_CL, [(1, 1), (4, 2)], "persistent_rows_kernel",
                   (16, 1))


def test_nchw_takes_the_contiguous_kernel():
    """NCHW takes the contiguous layout's persistent backward, not this one
    (tests/test_cuda_emu_persistent_nchw_backward.py tests it)."""
    x = rows_input((4, 8, 6, 6), torch.float32, channels_last=False)
    dy = rows_input((4, 8, 6, 6), torch.float32, channels_last=False, seed=1)
    w, _ = params(8, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = backward_call(dy, x, w)
    assert ks == ["persistent_nchw_backward_kernel"], ks


@pytest.mark.parametrize("train,mask,expect", [
    # eval: dx from dy alone, written by the reduction when the sums are asked for too
    (False, ALL, ["eval_dx_params_kernel", "reduce_rows_kernel", "merge_partials_kernel"]),
    (False, [True, False, False], ["eval_dx_coeffs_kernel", "ew_rows_kernel"]),
    (True, [False, True, True], STREAMING_CL[:2]),               # no dx: the reduction only
    (True, [False, True, False], STREAMING_CL[:2]),
])
def test_other_cases_stay_streaming(train, mask, expect):
    """Eval mode and a backward without grad_input keep the streaming launches (the reduction
    without dx reads dy and x once each already) and still match the CPU op."""
    shape = (4, 32, 6, 6)
    x, dy = rows_input(shape, torch.float32), rows_input(shape, torch.float32, seed=1)
    w, _ = params(32, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = backward_call(dy, x, w, train, mask)
        assert ks == expect, ks
        check_backward(x, dy, w, train, mask)


def test_slabs_launch_one_cooperative_grid_each():
    """256 float32 channels are 2 CTA columns (32 lanes x 4 channels); 288 rows of dy and x of a
    column (288 KB) need 2 CTAs of <= 227 KB: on 3 SMs x 1 a slab holds one column (spread over
    3 CTAs), 2 launches."""
    shape = (8, 256, 6, 6)
    x, dy = rows_input(shape, torch.float32), rows_input(shape, torch.float32, seed=1)
    w, _ = params(256, torch.float32)
    with emu_config(sm_count=3, blocks_per_sm=1):
        ks, call = backward_call(dy, x, w)
        assert ks == [PERSISTENT, PERSISTENT], ks
        assert [l.grid[:2] for l in call.launches] == [(1, 3), (1, 3)]
        check_backward(x, dy, w, True, ALL)


# ---- the results ------------------------------------------------------------------------------

ROWS_SHAPES = [
    ((4, 64, 7, 7), True),      # V = 16 bytes, TX = C / V lanes
    ((3, 24, 5, 5), True),      # float32 V = 4, TX = 6: idle lanes, 5 rows per warp
    ((5, 7, 3, 3), True),       # C odd: scalar, TX = 7
    ((2, 40, 4, 4, 4), True),   # channels_last_3d
    ((200, 100), False),        # (N, C)
    ((1, 3, 1, 1), True),       # one row
]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape,cl", ROWS_SHAPES, ids=shape_id)
def test_persistent_matches_the_rule(shape, cl, pair):
    """grad_input, grad_weight, grad_bias against the CPU op and the long-double reference, two
    seeds bit for bit (check_backward)."""
    x, dy = rows_input(shape, pair[0], cl), rows_input(shape, pair[0], cl, seed=1)
    w, _ = params(shape[1], pair[1])
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, ALL)


MASKS_WITH_DX = [[True, True, False], [True, False, True], [True, False, False]]


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("mask", MASKS_WITH_DX, ids=lambda m: "".join("1" if v else "0"
                                                                      for v in m))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_masks_and_weight_none(mask, weight, dtype):
    """The output masks with grad_input (the others are empty tensors of the CPU op's dtype) and
    weight None (a = invstd; grad_weight / grad_bias in the accumulation type)."""
    shape = (4, 16, 5, 5)
    x, dy = rows_input(shape, dtype), rows_input(shape, dtype, seed=1)
    w = params(16, dtype)[0] if weight else None
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w, True, mask)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift,scale", [(1e4, 1e-2), (300.0, 1.0)])
def test_persistent_large_mean(dtype, shift, scale):
    """|mean| >> std: x - mean against the saved mean in the compensated sums and in dx."""
    x = rows_input((4, 16, 7, 7), dtype, scale=scale, shift=shift)
    dy = rows_input((4, 16, 7, 7), dtype, seed=1)
    w, _ = params(16, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, ALL)


def check_nonfinite(dy, x, w, kernel):
    """The persistent backward (kernel) on dy, x holding +-Inf / NaN: NaN and Inf where the CPU op
    has them, the finite values by the rule, the same non-finite places as the streaming path,
    the same bits under three seeds."""
    mean, invstd = saved_stats(x, w)
    args = (dy, x, w, mean, invstd, True, ALL)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [kernel]
        pers = emu_ops().backward(*args)
        for seed in (1, 2):
            with emu_config(seed=seed):
                again = emu_ops().backward(*args)
            for i in range(3):
                R.assert_bitwise_equal(pers[i], again[i], "output %d, seed %d" % (i, seed))
        with emu_config(persistent=False):
            stream = emu_ops().backward(*args)
    cpu = CPU.backward(*args)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's NaN channels
        ref = R.bwd(dy, x, w, mean, invstd, True)
    for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias")):
        assert not torch.isfinite(cpu[i]).all(), nm  # the case tests what it says
        R.assert_rule(nm, pers[i], cpu[i], ref[i])
        assert torch.equal(torch.isnan(pers[i]), torch.isnan(stream[i])), nm
        assert torch.equal(torch.isinf(pers[i]), torch.isinf(stream[i])), nm


def test_persistent_nonfinite():
    """+-Inf and NaN in x (so in the saved statistics) and in dy (check_nonfinite)."""
    shape = (4, 8, 5, 5)
    x, dy = rows_input(shape, torch.float32), rows_input(shape, torch.float32, seed=1)
    x[1, 2, 3, 4] = float("inf")
    x[2, 5, 1, 1] = float("nan")
    dy[0, 3, 0, 0] = float("-inf")
    dy[3, 6, 2, 2] = float("nan")
    w, _ = params(8, torch.float32)
    check_nonfinite(dy, x, w, PERSISTENT)


AGREE_SHAPES = [((2, 256, 14, 14), True), ((2, 64, 28, 28), True), ((512, 256), False)]


def check_agree(dy, x, w, kernel, sm_count=8):
    """The persistent backward (kernel) and the streaming one on one input, both within the rule
    (they differ only in how the values are cut into partials); the persistent results the same
    bits under two seeds."""
    mean, invstd = saved_stats(x, w)
    args = (dy, x, w, mean, invstd, True, ALL)
    ref = R.bwd(dy, x, w, mean, invstd, True)
    cpu = CPU.backward(*args)
    with emu_config(sm_count=sm_count, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [kernel]
        runs = []
        for seed in (1, 2):
            with emu_config(seed=seed):
                runs.append(emu_ops().backward(*args))
        with emu_config(persistent=False):
            stream = emu_ops().backward(*args)
    for i, nm in enumerate(("grad_input", "grad_weight", "grad_bias")):
        R.assert_bitwise_equal(runs[0][i], runs[1][i], nm + " under seeds 1, 2")
        R.assert_rule(nm + " (persistent)", runs[0][i], cpu[i], ref[i])
        R.assert_rule(nm + " (streaming)", stream[i], cpu[i], ref[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", AGREE_SHAPES, ids=["cl14", "cl28", "nc"])
def test_persistent_and_streaming_agree(shape, cl, dtype):
    x, dy = rows_input(shape, dtype, cl), rows_input(shape, dtype, cl, seed=1)
    w, _ = params(shape[1], torch.float32)
    check_agree(dy, x, w, PERSISTENT)


# ---- traffic --------------------------------------------------------------------------------

# The scaled-down ResNet-50 layers of tests/test_cuda_emu_traffic.py (N*H*W / 16 on 8 SMs) whose
# dy and x fit on chip there; cl56 float32 (3.2 MB of dy and x against 8 x 227 KB) does not.
TRAFFIC_CASES = [("cl14", (2, 256, 14, 14), True, torch.float32),
                 ("cl14", (2, 256, 14, 14), True, torch.bfloat16),
                 ("cl56", (2, 64, 56, 56), True, torch.bfloat16),
                 ("nc", (512, 256), False, torch.float32),
                 ("nc", (512, 256), False, torch.bfloat16)]


def check_traffic(dy, x, w, kernel):
    """dy read once, x read once, dx written once; beyond them exactly the per-channel extras of
    the persistent backward kernels (bn_persistent_backward.cuh, bn_persistent_nchw_backward.cuh),
    with gy CTAs per column and 4-byte accumulation (float32 for float32 and bfloat16):
      mean       read  C * gy * 4 (once per CTA) + C * 4 (the epilogue's coefficient k2)
      invstd     read  C * 4;   weight read C * |w|;   grad_weight, grad_bias written C * |w|
      partials   written and read C * gy * 16 (GradPartial: two compensated sums)
      coeffs     written 4 C * 4, read 4 C * 4 per CTA of its column (4 C * gy * 4 in all);
    total = 3 |x| + those; every bulk access within 1.1x of the ideal sectors. The streaming path
    on the same input moves 5 |x|. Every launch (slab) is the kernel."""
    C = x.shape[1]
    xbytes = x.numel() * x.element_size()
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, call = backward_call(dy, x, w)
        with emu_config(persistent=False):
            _, stream = backward_call(dy, x, w)
    assert ks == [kernel] * len(call.launches), ks
    table = call.table(xbytes)
    gy = call.launches[0].grid[1]
    wb = w.element_size()
    assert call.read("grad_output") == xbytes, table
    assert call.read("input") == xbytes, table
    assert call.written("grad_input") == xbytes and call.read("grad_input") == 0, table
    assert call.written("grad_output") == 0 and call.written("input") == 0, table
    assert call.read("mean") == C * (gy + 1) * 4, table
    assert call.read("invstd") == C * 4 and call.read("weight") == C * wb, table
    assert call.written("grad_weight") == C * wb and call.written("grad_bias") == C * wb, table
    extras = C * (gy + 1) * 4 + C * 4 + C * wb + 2 * C * wb
    extras += 2 * C * gy * 16 + 4 * C * 4 + 4 * C * gy * 4
    assert call.total() == 3 * xbytes + extras, table
    assert call.total(big=xbytes // 2) == 3 * xbytes, table
    assert stream.total(big=xbytes // 2) == 5 * xbytes, stream.table(xbytes)
    for l in call.launches:
        for t in l.tensors.values():
            if t.size < xbytes // 2:
                continue
            for d in (t.read, t.write):
                assert not d.accesses or d.sector_ratio <= 1.1, table


@pytest.mark.parametrize("name,shape,cl,dtype", TRAFFIC_CASES,
                         ids=["%s-%s" % (c[0], str(c[3])[6:]) for c in TRAFFIC_CASES])
def test_persistent_backward_reads_dy_and_x_once(name, shape, cl, dtype):
    """check_traffic on the rows layouts."""
    x, dy = rows_input(shape, dtype, cl), rows_input(shape, dtype, cl, seed=1)
    w, _ = params(shape[1], dtype)
    check_traffic(dy, x, w, PERSISTENT)
