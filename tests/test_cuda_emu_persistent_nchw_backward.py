"""The persistent single-read training backward of the contiguous layout (issue 15;
csrc/cuda/bn_persistent_nchw_backward.cuh, the body and planner of bn_persistent_nchw.cuh) under
the CUDA emulation: NCHW, NCDHW and (N, C, L) inputs, a cooperative launch per slab of CTA
columns whose CTAs hold their tiles of dy and x in shared memory across two grid barriers (the
emulator runs them co-resident and switches between them there).

- which path backward takes: persistent in training mode with grad_input asked for where the
  slab's two tiles fit the co-resident CTAs; the streaming launches (planes / packed reduction,
  merge, dx pass) where they do not (an SM count and occupancy too small -- also where the
  forward's single tile still fits), when the persistent paths are turned off, in eval mode and
  without grad_input; several slabs (one launch each) and several sample ranges in between;
- the persistent results against the CPU op and the long-double reference (the rule of
  tests/emu_reference.py) under two seeds bit for bit (the emulator shuffles the order of the
  CTAs in every round between grid barriers): every dtype pair, packed groups of small planes
  (16-byte vectors across plane boundaries, 7x7, and scalars: 5x5, 3x3 with C * S odd), large
  planes cut into segments (lengths not a multiple of the vector), NCDHW, (N, C, L), N not a
  multiple of 4, dy and x starting inside a 16-byte line (at one position: vectors; at two:
  scalars), the output masks, weight None, large means, +-Inf and NaN, the 64-bit index kernels
  (bit for bit the 32-bit ones'); persistent and streaming on one input both within the rule;
- traffic: dy read once, x read once, dx written once, and exactly the per-channel extras the
  kernel's header states; every bulk access within 1.1x of the ideal sectors.
"""
import pytest
import torch

import emu_reference as R
from emu_testing import emu_config, emu_ops, require_emu
from test_cuda_emu_ops import check_backward, params
from test_cuda_emu_paths import placed
from test_cuda_emu_persistent import DTYPE_PAIRS, pair_id
from test_cuda_emu_persistent_backward import (ALL, MASKS_WITH_DX, backward_call, check_agree,
                                               check_fallback, check_nonfinite, check_traffic,
                                               saved_stats)
from test_cuda_emu_persistent_nchw import PATH_CASES, TRAFFIC_SHAPES, nchw_input, sid

PERSISTENT = "persistent_nchw_backward_kernel"
STREAMING_PACKED = ["reduce_packed_kernel", "merge_partials_kernel", "ew_contig_kernel"]
STREAMING_PLANES = ["reduce_planes_kernel", "merge_partials_kernel", "ew_contig_kernel"]


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def inputs(shape, dtype, scale=1.0, shift=0.0):
    return nchw_input(shape, dtype, scale=scale, shift=shift), nchw_input(shape, dtype, seed=1)


# ---- the path taken ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,reduction", PATH_CASES, ids=sid)
def test_nchw_takes_the_persistent_path(shape, reduction):
    """The forward's cases (packed, planes, NCDHW, (N, C, L)); the streaming reduction the same
    as the forward's statistics."""
    x, dy = inputs(shape, torch.float32)
    w, _ = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = backward_call(dy, x, w)
        assert ks == [PERSISTENT], ks
        with emu_config(persistent=False):
            ks, _ = backward_call(dy, x, w)
        assert ks == [reduction, "merge_partials_kernel", "ew_contig_kernel"], ks


def test_streaming_when_the_tiles_do_not_fit():
    """dy and x of (64, 4, 32, 32) float32 are 2 MB: the 64 samples of one channel (512 KB of dy
    and x) need 3 CTAs of at most 227 KB, which 1 SM x 1 and 2 SMs x 1 cannot give, where the
    forward's 256 KB of x per channel fits 2; 8 SMs x 2 hold them (sample ranges of each channel
    on several CTAs)."""
    shape = (64, 4, 32, 32)
    x, dy = inputs(shape, torch.float32)
    w, _ = params(4, torch.float32)
    call = check_fallback(dy, x, w, PERSISTENT, STREAMING_PLANES, [(1, 1), (2, 1)],
                          "persistent_nchw_kernel", (8, 2))
    assert call.launches[0].grid[1] >= 2, call.launches[0].grid


def test_streaming_when_disabled():
    x, dy = inputs((4, 8, 7, 7), torch.float32)
    w, _ = params(8, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0, persistent=False):
        ks, _ = backward_call(dy, x, w)
    assert ks == STREAMING_PACKED, ks


@pytest.mark.parametrize("train,mask,expect", [
    # eval: dx from dy alone, written by the reduction when the sums are asked for too
    (False, ALL, ["eval_dx_params_kernel", "reduce_packed_kernel", "merge_partials_kernel"]),
    (False, [True, False, False], ["eval_dx_coeffs_kernel", "ew_contig_kernel"]),
    (True, [False, True, True], STREAMING_PACKED[:2]),           # no dx: the reduction only
    (True, [False, False, True], STREAMING_PACKED[:2]),
])
def test_other_cases_stay_streaming(train, mask, expect):
    """Eval mode and a backward without grad_input keep the streaming launches (the reduction
    without dx reads dy and x once each already) and still match the CPU op."""
    x, dy = inputs((4, 16, 6, 6), torch.float32)
    w, _ = params(16, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = backward_call(dy, x, w, train, mask)
        assert ks == expect, ks
        check_backward(x, dy, w, train, mask)


def test_slabs_launch_one_cooperative_grid_each():
    """8 x 64 planes of 16 x 16 float32 (dy and x 1 MB): groups of 3 planes of 256 values (22
    units), 8 samples of a unit 49 KB of the two tiles, so at most 4 units per CTA of <= 227 KB:
    6 columns; 2 co-resident CTAs hold a slab of 2 columns, 3 launches."""
    shape = (8, 64, 16, 16)
    x, dy = inputs(shape, torch.float32)
    w, _ = params(64, torch.float32)
    with emu_config(sm_count=2, blocks_per_sm=1):
        ks, call = backward_call(dy, x, w)
        assert ks == [PERSISTENT] * 3, ks
        assert [l.grid[:2] for l in call.launches] == [(2, 1)] * 3
        check_backward(x, dy, w, True, ALL)


def test_several_sample_ranges_per_channel():
    """64 samples of 4 channels of 8 x 8 (one group, 256 values a sample): the planner spreads the
    samples over several CTA rows; the rows' partials merge in a fixed order (the same bits under
    two seeds: check_backward)."""
    shape = (64, 4, 8, 8)
    x, dy = inputs(shape, torch.float32)
    w, _ = params(4, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, call = backward_call(dy, x, w)
        assert ks == [PERSISTENT], ks
        assert call.launches[0].grid[:2] == (1, 2), call.launches[0].grid
        check_backward(x, dy, w, True, ALL)


# ---- the results ------------------------------------------------------------------------------

NCHW_SHAPES = [
    (4, 64, 7, 7),      # packed, 16-byte vectors crossing plane boundaries
    (3, 5, 7, 7),       # C * S odd: scalar packed, N not a multiple of 4
    (5, 8, 5, 5),       # 5x5 planes, N = 5
    (2, 7, 3, 3),       # 3x3 planes, C * S odd
    (2, 3, 40, 40),     # float32: planes of two segments; half: packed, a plane per group
    (2, 2, 45, 51),     # S = 2295, not a multiple of V: each sample's window sits differently
    (2, 4, 3, 5, 7),    # NCDHW, S = 105
    (4, 6, 33),         # (N, C, L)
    (1, 3, 2, 2),       # S = 4: float32 vectors span two channels; half scalar
]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", NCHW_SHAPES, ids=sid)
def test_persistent_matches_the_rule(shape, pair):
    """grad_input, grad_weight, grad_bias against the CPU op and the long-double reference, two
    seeds bit for bit, the streaming path too (check_backward)."""
    x, dy = inputs(shape, pair[0])
    w, _ = params(shape[1], pair[1])
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, ALL)


@pytest.mark.parametrize("dtype,offsets", [
    (torch.float32, (1, 1)), (torch.float32, (3, 3)), (torch.float16, (5, 5)),
    (torch.float64, (1, 1)), (torch.float32, (1, 2)), (torch.bfloat16, (0, 3))])
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (2, 3, 33, 35)], ids=sid)
def test_persistent_unaligned_inputs(shape, dtype, offsets):
    """dy and x start inside a 16-byte line: at one position, vectors aligned to the address
    (partial vectors at each window's ends read element-wise) and dx (fresh, aligned) stored
    element-wise; at two positions, scalars."""
    x = placed(shape, dtype, offsets[0])
    torch.manual_seed(1)
    dy = placed(shape, dtype, offsets[1])
    w, _ = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, ALL)


@pytest.mark.parametrize("shape,dtype", [((4, 64, 7, 7), torch.float32),
                                         ((2, 2, 45, 51), torch.bfloat16),
                                         ((3, 5, 7, 7), torch.float64)], ids=sid)
def test_persistent_index64(shape, dtype):
    """The 64-bit index instantiations (forced through the test seam) give the 32-bit ones'
    results bit for bit."""
    x, dy = inputs(shape, dtype)
    w, _ = params(shape[1], torch.float32)
    mean, invstd = saved_stats(x, w)
    res = []
    with emu_config(sm_count=8, blocks_per_sm=0):
        for force in (False, True):
            with emu_config(force_index64=force):
                assert backward_call(dy, x, w)[0] == [PERSISTENT]
                res.append(emu_ops().backward(dy, x, w, mean, invstd, True, ALL))
    for i, (a, c) in enumerate(zip(*res)):
        R.assert_bitwise_equal(a, c, "output %d, 64-bit vs 32-bit index kernels" % i)


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("mask", MASKS_WITH_DX, ids=lambda m: "".join("1" if v else "0"
                                                                      for v in m))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_masks_and_weight_none(mask, weight, dtype):
    """The output masks with grad_input (the others are empty tensors of the CPU op's dtype) and
    weight None (a = invstd; grad_weight / grad_bias in the accumulation type)."""
    shape = (4, 16, 5, 5)
    x, dy = inputs(shape, dtype)
    w = params(16, dtype)[0] if weight else None
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w, True, mask)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift,scale", [(1e4, 1e-2), (300.0, 1.0)])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (2, 2, 40, 40)], ids=sid)
def test_persistent_large_mean(shape, dtype, shift, scale):
    """|mean| >> std: x - mean against the saved mean in the compensated sums and in dx."""
    x, dy = inputs(shape, dtype, scale=scale, shift=shift)
    w, _ = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert backward_call(dy, x, w)[0] == [PERSISTENT]
        check_backward(x, dy, w, True, ALL)


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (2, 8, 40, 40)], ids=sid)
def test_persistent_nonfinite(shape):
    """+-Inf and NaN in x (so in the saved statistics) and in dy (check_nonfinite of the rows
    layout's tests)."""
    x, dy = inputs(shape, torch.float32)
    x[1, 2, 3, 4] = float("inf")
    x[0, 5, 1, 1] = float("nan")
    dy[0, 3, 0, 0] = float("-inf")
    dy[1, 6, 2, 2] = float("nan")
    w, _ = params(8, torch.float32)
    check_nonfinite(dy, x, w, PERSISTENT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(TRAFFIC_SHAPES))
def test_persistent_and_streaming_agree(name, dtype):
    """Both paths on one input, both within the rule, the persistent results the same bits under
    two seeds (check_agree); on 16 SMs, where dy and x of every one of these shapes fit."""
    shape = TRAFFIC_SHAPES[name]
    x, dy = inputs(shape, dtype)
    w, _ = params(shape[1], torch.float32)
    check_agree(dy, x, w, PERSISTENT, sm_count=16)


# ---- traffic --------------------------------------------------------------------------------

# The scaled-down ResNet-50 layers of tests/test_cuda_emu_traffic.py (N*H*W / 16 on 8 SMs): dy and
# x of each fit on chip there, nchw56 float32 (3.2 MB against 8 x 227 KB) in two slabs.
TRAFFIC_CASES = [(name, dtype) for name in TRAFFIC_SHAPES
                 for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", TRAFFIC_CASES,
                         ids=["%s-%s" % (c[0], str(c[1])[6:]) for c in TRAFFIC_CASES])
def test_persistent_backward_reads_dy_and_x_once(name, dtype):
    """check_traffic (dy, x read once, dx written once, the kernel's per-channel extras
    exactly; gy = CTA rows) on the contiguous layout."""
    x, dy = inputs(TRAFFIC_SHAPES[name], dtype)
    w, _ = params(x.shape[1], dtype)
    check_traffic(dy, x, w, PERSISTENT)
