"""The persistent single-read training forward of the contiguous layout (issue 15;
csrc/cuda/bn_persistent_nchw.cuh) under the CUDA emulation: NCHW, NCDHW and (N, C, L) inputs,
a cooperative launch per slab of CTA columns whose CTAs hold their tile of x in shared memory
across two grid barriers (the emulator runs them co-resident and switches between them there).

- which path forward_train takes: persistent where the slab fits the co-resident CTAs, the
  streaming three launches (planes / packed statistics, merge, element-wise) where it does not
  (an SM count and occupancy too small for it) and when the persistent paths are turned off;
  several slabs (one launch each) in between;
- the persistent results against the CPU op and the long-double reference (the strict rule of
  tests/emu_reference.py, as tests/test_cuda_emu_ops.py) under two seeds bit for bit (the
  emulator shuffles the order of the CTAs in every round between grid barriers): every dtype,
  packed groups of small planes (16-byte vectors and scalars), segmented large planes (plane
  lengths not a multiple of the vector: each sample's window sits differently in its lines),
  NCDHW, (N, C, L), several sample ranges per channel, inputs that start inside a 16-byte line,
  weight and bias None, large means, +-Inf and NaN (as the streaming path treats them), the
  64-bit index kernels (bit for bit the 32-bit ones');
- persistent == streaming within the rule, on the traffic test's ResNet-50 shapes;
- traffic: forward_train reads x once -- |x| plus the per-channel shift, one value per channel
  and CTA row and one per channel for the epilogue -- and writes y once, with at most 1.1x the
  ideal sectors per warp access (7x7 planes included: the windows of whole planes are contiguous
  runs, so only a window's first and last vectors are partial).
"""
import numpy as np
import pytest
import torch

import emu_reference as R
from bn_testing import random_values
from emu_testing import emu_config, emu_ops, require_emu, traffic
from test_cuda_emu_ops import CPU, EPS, check_forward_train, params, run_emu
from test_cuda_emu_paths import placed
from test_cuda_emu_persistent import DTYPE_PAIRS, pair_id

PERSISTENT = "persistent_nchw_kernel"
STREAMING_PACKED = ["reduce_packed_kernel", "merge_partials_kernel", "ew_contig_kernel"]
STREAMING_PLANES = ["reduce_planes_kernel", "merge_partials_kernel", "ew_contig_kernel"]


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def nchw_input(shape, dtype, scale=1.0, shift=0.0, seed=0):
    torch.manual_seed(seed)
    x = (random_values(shape, scale=scale) + shift).to(dtype)
    assert x.is_contiguous()
    return x


def kernels_of(x, w, b):
    with traffic() as t:
        emu_ops().forward_train(x, w, b, EPS)
    assert len(t.calls) == 1
    return t.calls[0].kernels(), t.calls[0]


def sid(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ---- the path ---------------------------------------------------------------------------------

# (shape, the streaming reduction kernel) of the path tests (here and of the backward's).
PATH_CASES = [
    ((4, 8, 6, 6), "reduce_packed_kernel"),     # packed groups of small planes
    ((2, 3, 40, 40), "reduce_planes_kernel"),   # S = 1600 float32: two segments per plane
    ((2, 8, 3, 4, 5), "reduce_packed_kernel"),  # NCDHW
    ((4, 6, 33), "reduce_packed_kernel"),       # (N, C, L)
]


@pytest.mark.parametrize("shape,reduction", PATH_CASES, ids=sid)
def test_nchw_takes_the_persistent_path(shape, reduction):
    x = nchw_input(shape, torch.float32)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = kernels_of(x, w, b)
        assert ks == [PERSISTENT], ks
        with emu_config(persistent=False):
            ks, _ = kernels_of(x, w, b)
        assert ks == [reduction] + STREAMING_PACKED[1:], ks


def test_streaming_when_it_does_not_fit():
    """The 64 samples of one channel's 32 x 32 float32 planes are 256 KB: more than one CTA of at
    most 227 KB holds, and the one co-resident CTA of 1 SM x 1 cannot be two sample ranges: the
    streaming path; with 8 SMs x 2 it fits (sample ranges of each channel on several CTAs)."""
    x = nchw_input((64, 4, 32, 32), torch.float32)
    w, b = params(4, torch.float32)
    with emu_config(sm_count=1, blocks_per_sm=1):
        ks, _ = kernels_of(x, w, b)
    assert ks == STREAMING_PLANES, ks
    with emu_config(sm_count=8, blocks_per_sm=2):
        ks, call = kernels_of(x, w, b)
        assert ks == [PERSISTENT], ks
        assert call.launches[0].grid[1] >= 2, call.launches[0].grid
        check_forward_train(x, w, b)


def test_slabs_launch_one_cooperative_grid_each():
    """8 x 64 planes of 16 x 16 float32 (512 KB): groups of 3 planes of 256 values (22 units), at
    most 8 units of 8 samples per CTA of <= 227 KB: 3 columns; 2 co-resident CTAs hold a slab of
    2 columns, 2 launches."""
    x = nchw_input((8, 64, 16, 16), torch.float32)
    w, b = params(64, torch.float32)
    with emu_config(sm_count=2, blocks_per_sm=1):
        ks, call = kernels_of(x, w, b)
        assert ks == [PERSISTENT, PERSISTENT], ks
        assert [l.grid[:2] for l in call.launches] == [(2, 1), (1, 1)]
        check_forward_train(x, w, b)


def test_several_sample_ranges_per_channel():
    """64 samples of 4 channels of 8 x 8 (one group, 256 values a sample): the planner gives each
    CTA row 32 samples (8192 values, 32 KB); the rows' partials merge in a fixed order."""
    x = nchw_input((64, 4, 8, 8), torch.float32)
    w, b = params(4, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, call = kernels_of(x, w, b)
        assert ks == [PERSISTENT], ks
        assert call.launches[0].grid[:2] == (1, 2), call.launches[0].grid
        out = [None, None]
        for i, seed in enumerate((3, 11)):
            with emu_config(seed=seed):
                out[i] = emu_ops().forward_train(x, w, b, EPS)
        for a, b_ in zip(*out):
            R.assert_bitwise_equal(a, b_, "forward_train under seeds 3 and 11")
        check_forward_train(x, w, b)


# ---- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", [
    (4, 64, 7, 7),      # packed, 16-byte vectors crossing plane boundaries
    (3, 5, 7, 7),       # C * S odd: scalar packed
    (2, 3, 40, 40),     # float32: planes of two segments; half: packed, a plane per group
    (2, 2, 45, 51),     # S = 2295, not a multiple of V: each sample's window sits differently
    (2, 4, 3, 5, 7),    # NCDHW, S = 105
    (4, 6, 33),         # (N, C, L)
    (1, 3, 2, 2),       # S = 4: float32 vectors span two channels; half scalar
], ids=sid)
def test_persistent_matches_the_rule(shape, pair):
    x = nchw_input(shape, pair[0])
    w, b = params(shape[1], pair[1])
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        check_forward_train(x, w, b)


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1), (torch.float32, 3),
                                          (torch.float16, 5), (torch.float64, 1)])
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (2, 3, 33, 35)], ids=sid)
def test_persistent_unaligned_input(shape, dtype, offset):
    """x starts inside a 16-byte line: vectors aligned to the address (partial vectors at each
    window's ends read element-wise), y (fresh, aligned) stored element-wise."""
    x = placed(shape, dtype, offset)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        check_forward_train(x, w, b)


@pytest.mark.parametrize("shape,dtype", [((4, 64, 7, 7), torch.float32),
                                         ((2, 2, 45, 51), torch.bfloat16),
                                         ((3, 5, 7, 7), torch.float64)], ids=sid)
def test_persistent_index64(shape, dtype):
    """The 64-bit index instantiations (forced through the test seam) give the 32-bit ones'
    results bit for bit."""
    x = nchw_input(shape, dtype)
    w, b = params(shape[1], torch.float32)
    res = []
    with emu_config(sm_count=8, blocks_per_sm=0):
        for force in (False, True):
            with emu_config(force_index64=force):
                assert kernels_of(x, w, b)[0] == [PERSISTENT]
                res.append(emu_ops().forward_train(x, w, b, EPS))
    for i, (a, c) in enumerate(zip(*res)):
        R.assert_bitwise_equal(a, c, "output %d, 64-bit vs 32-bit index kernels" % i)


def test_persistent_without_affine():
    x = nchw_input((4, 3, 7, 7), torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, None, None)[0] == [PERSISTENT]
        check_forward_train(x, None, None)
        w, _ = params(3, torch.float32)
        check_forward_train(x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift,scale", [(1e4, 1e-2), (300.0, 1.0), (1e6, 1.0)])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (2, 2, 40, 40)], ids=sid)
def test_persistent_large_mean(shape, dtype, shift, scale):
    """|mean| >> std: the per-channel shift and the split-mean normalize, as on the streaming
    path."""
    x = nchw_input(shape, dtype, scale=scale, shift=shift)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        check_forward_train(x, w, b)


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (2, 8, 40, 40)], ids=sid)
def test_persistent_nonfinite(shape):
    """+Inf, -Inf (one of them a channel's first value: shift 0) and NaN: the same outputs as the
    streaming path and the CPU op (NaN where they have NaN)."""
    x = nchw_input(shape, torch.float32)
    x[1, 2, 3, 4] = float("inf")
    x[0, 3, 0, 0] = float("-inf")
    x[1, 5, 1, 1] = float("nan")
    x[0, 6, 2, 2] = float("inf")
    x[1, 6, 4, 4] = float("-inf")   # +Inf and -Inf in one channel
    w, b = params(8, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        pers = run_emu("forward_train", x, w, b, EPS)
        with emu_config(persistent=False):
            stream = run_emu("forward_train", x, w, b, EPS)
    cpu = CPU.forward_train(x, w, b, EPS)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's NaN channels
        ref = R.fwd_train(x, w, b, EPS)
    for nm, p, s, c, r in zip(("output", "mean", "invstd", "var"), pers, stream, cpu, ref):
        assert torch.equal(p.isnan(), s.isnan()) and torch.equal(p.isinf(), s.isinf()), nm
        R.assert_rule(nm, p, c, r)
        R.assert_rule(nm + " (streaming)", s, c, r)


TRAFFIC_SHAPES = {"nchw56": (2, 64, 56, 56), "nchw28": (2, 128, 28, 28), "nchw7": (2, 512, 7, 7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(TRAFFIC_SHAPES))
def test_persistent_and_streaming_agree(name, dtype):
    """Both paths on one input, both within the rule (they differ only in how the samples are
    cut into partials)."""
    shape = TRAFFIC_SHAPES[name]
    x = nchw_input(shape, dtype)
    w, b = params(shape[1], torch.float32)
    ref = R.fwd_train(x, w, b, EPS)
    cpu = CPU.forward_train(x, w, b, EPS)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        pers = emu_ops().forward_train(x, w, b, EPS)
        with emu_config(persistent=False):
            stream = emu_ops().forward_train(x, w, b, EPS)
    for nm, p, s, c, r in zip(("output", "mean", "invstd", "var"), pers, stream, cpu, ref):
        R.assert_rule(nm + " (persistent)", p, c, r)
        R.assert_rule(nm + " (streaming)", s, c, r)


# ---- traffic --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(TRAFFIC_SHAPES))
def test_persistent_reads_x_once(name, dtype):
    """ResNet-50 layers scaled down as in test_cuda_emu_traffic.py (N*H*W / 16 on 8 SMs): x read
    once -- |x| plus C * (gy + 1) shift values (one per channel and CTA row, one per channel for
    the epilogue) --, y written once, every bulk access within 1.1x of the ideal sectors; the
    streaming path on the same input reads x twice."""
    shape = TRAFFIC_SHAPES[name]
    x = nchw_input(shape, dtype)
    C = shape[1]
    w, b = params(C, dtype)
    xbytes = x.numel() * x.element_size()
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, call = kernels_of(x, w, b)
        with emu_config(persistent=False):
            _, stream = kernels_of(x, w, b)
    assert ks == [PERSISTENT], ks
    gy = call.launches[0].grid[1]
    shift_bytes = C * (gy + 1) * x.element_size()
    assert call.read("input") == xbytes + shift_bytes, call.table(xbytes)
    assert call.written("output") == xbytes, call.table(xbytes)
    assert stream.read("input") >= 2 * xbytes, stream.table(xbytes)
    for l in call.launches:
        for t in l.tensors.values():
            if t.size < xbytes // 2:
                continue
            for d in (t.read, t.write):
                assert not d.accesses or d.sector_ratio <= 1.1, call.table(xbytes)
