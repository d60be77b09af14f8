"""The persistent single-read training forward (issue 15; csrc/cuda/bn_persistent.cuh) under the
CUDA emulation: a cooperative launch per slab of channel columns whose CTAs hold their tile of x
in shared memory across two grid barriers (the emulator runs them co-resident and switches
between them there).

- which path forward_train takes: persistent for the rows layout (channels_last, (N, C)) where
  the slab fits the co-resident CTAs, the streaming three launches where it does not (an SM count
  and occupancy too small for it), when the persistent paths are turned off; NCHW takes its own
  persistent kernel (tests/test_cuda_emu_persistent_nchw.py), never this one;
- the persistent results against the CPU op and the long-double reference (the strict rule of
  tests/emu_reference.py, as tests/test_cuda_emu_ops.py), every dtype, odd channel counts (narrow
  vectors, idle lanes), several slabs, large means, +-Inf, under two seeds bit for bit (the
  emulator shuffles the order of the CTAs in every round between grid barriers);
- traffic: where it applies, forward_train reads x once (plus one shift value per channel and
  CTA) and writes y once, with at most 1.1x the ideal sectors per warp access.
"""
import numpy as np
import pytest
import torch

import emu_reference as R
from bn_testing import random_values
from emu_testing import emu_config, emu_ops, require_emu, traffic
from test_cuda_emu_ops import CPU, EPS, check_forward_train, params, run_emu

PERSISTENT = "persistent_rows_kernel"
STREAMING_CL = ["reduce_rows_kernel", "merge_partials_kernel", "ew_rows_kernel"]


@pytest.fixture(autouse=True)
def _emu():
    require_emu()


def rows_input(shape, dtype, channels_last=True, scale=1.0, shift=0.0, seed=0):
    torch.manual_seed(seed)
    x = (random_values(shape, scale=scale) + shift).to(dtype)
    if channels_last and x.dim() >= 4:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def kernels_of(x, w, b):
    with traffic() as t:
        emu_ops().forward_train(x, w, b, EPS)
    assert len(t.calls) == 1
    return t.calls[0].kernels(), t.calls[0]


@pytest.mark.parametrize("shape,cl", [((4, 32, 6, 6), True), ((300, 24), False),
                                      ((2, 8, 3, 4, 5), True)])
def test_rows_layout_takes_the_persistent_path(shape, cl):
    x = rows_input(shape, torch.float32, cl)
    w, b = params(shape[1], torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = kernels_of(x, w, b)
        assert ks == [PERSISTENT], ks
        with emu_config(persistent=False):
            ks, _ = kernels_of(x, w, b)
        assert ks == STREAMING_CL, ks


def test_streaming_when_the_slab_does_not_fit():
    """One co-resident CTA of at most 227 KB cannot hold 2048 rows of 128 float32 channels (1 MB):
    the streaming path; with 8 SMs x 2 it fits."""
    x = rows_input((8, 128, 16, 16), torch.float32)
    w, b = params(128, torch.float32)
    with emu_config(sm_count=1, blocks_per_sm=1):
        ks, _ = kernels_of(x, w, b)
    assert ks == STREAMING_CL, ks
    with emu_config(sm_count=8, blocks_per_sm=2):
        ks, _ = kernels_of(x, w, b)
    assert ks == [PERSISTENT], ks


def test_nchw_takes_its_own_kernel():
    x = rows_input((4, 8, 6, 6), torch.float32, channels_last=False)
    w, b = params(8, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, _ = kernels_of(x, w, b)
    assert ks == ["persistent_nchw_kernel"], ks


def test_slabs_launch_one_cooperative_grid_each():
    """256 float32 channels are 2 CTA columns (32 lanes x 4 channels); 1152 rows of a column need
    3 CTAs of <= 227 KB (spread over 4): on 4 SMs x 1 a slab holds one column, 2 launches."""
    x = rows_input((8, 256, 12, 12), torch.float32)
    w, b = params(256, torch.float32)
    with emu_config(sm_count=4, blocks_per_sm=1):
        ks, call = kernels_of(x, w, b)
        assert ks == [PERSISTENT, PERSISTENT], ks
        assert [l.grid[:2] for l in call.launches] == [(1, 4), (1, 4)]
        check_forward_train(x, w, b)


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
               (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]


def pair_id(p):
    """(input dtype, parameter dtype) as a test id: float16-float32."""
    return "%s-%s" % (str(p[0])[6:], str(p[1])[6:])


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape,cl", [
    ((4, 64, 7, 7), True),      # V = 16 bytes, TX = C / V lanes
    ((3, 24, 5, 5), True),      # float32 V = 4, TX = 6: idle lanes, 5 rows per warp
    ((5, 7, 3, 3), True),       # C odd: scalar, TX = 7
    ((2, 40, 4, 4, 4), True),   # channels_last_3d
    ((200, 100), False),        # (N, C)
    ((1, 3, 1, 1), True),       # one row
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_persistent_matches_the_rule(shape, cl, pair):
    x = rows_input(shape, pair[0], cl)
    w, b = params(shape[1], pair[1])
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        check_forward_train(x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift,scale", [(1e4, 1e-2), (300.0, 1.0), (1e6, 1.0)])
def test_persistent_large_mean(dtype, shift, scale):
    """|mean| >> std: the per-channel shift and the split-mean normalize, as on the streaming
    path."""
    x = rows_input((4, 16, 7, 7), dtype, scale=scale, shift=shift)
    w, b = params(16, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        assert kernels_of(x, w, b)[0] == [PERSISTENT]
        check_forward_train(x, w, b)


def test_persistent_nonfinite():
    x = rows_input((4, 8, 5, 5), torch.float32)
    x[1, 2, 3, 4] = float("inf")
    x[0, 3, 0, 0] = float("-inf")   # the channel's first value: shift 0
    x[2, 5, 1, 1] = float("nan")
    w, b = params(8, torch.float32)
    with emu_config(sm_count=8, blocks_per_sm=0):
        emu = run_emu("forward_train", x, w, b, EPS)
    cpu = CPU.forward_train(x, w, b, EPS)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's NaN channels
        ref = R.fwd_train(x, w, b, EPS)
    for nm, e, c, r in zip(("output", "mean", "invstd", "var"), emu, cpu, ref):
        assert not torch.isfinite(c).all() or nm == "invstd", nm  # the case tests what it says
        R.assert_rule(nm, e, c, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", [((2, 256, 14, 14), True), ((2, 64, 56, 56), True),
                                      ((512, 256), False)],
                         ids=["cl14", "cl56", "nc"])
def test_persistent_and_streaming_agree(shape, cl, dtype):
    """Both paths on one input, both within the rule (they differ only in how the rows are cut
    into partials)."""
    x = rows_input(shape, dtype, cl)
    w, b = params(shape[1], torch.float32)
    ref = R.fwd_train(x, w, b, EPS)
    cpu = CPU.forward_train(x, w, b, EPS)
    with emu_config(sm_count=8, blocks_per_sm=0):
        pers = emu_ops().forward_train(x, w, b, EPS)
        with emu_config(persistent=False):
            stream = emu_ops().forward_train(x, w, b, EPS)
    for nm, p, s, c, r in zip(("output", "mean", "invstd", "var"), pers, stream, cpu, ref):
        R.assert_rule(nm + " (persistent)", p, c, r)
        R.assert_rule(nm + " (streaming)", s, c, r)


# ---- traffic --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", [((2, 256, 14, 14), True), ((2, 64, 56, 56), True),
                                      ((512, 256), False)],
                         ids=["cl14", "cl56", "nc"])
def test_persistent_reads_x_once(shape, cl, dtype):
    """ResNet-50 layers scaled down as in test_cuda_emu_traffic.py (N*H*W / 16 on 8 SMs): x read
    once -- |x| plus one shift value per channel and CTA --, y written once, every bulk access
    within 1.1x of the ideal sectors; the streaming path on the same input reads x about twice."""
    x = rows_input(shape, dtype, cl)
    C = shape[1]
    w, b = params(C, dtype)
    xbytes = x.numel() * x.element_size()
    with emu_config(sm_count=8, blocks_per_sm=0):
        ks, call = kernels_of(x, w, b)
        with emu_config(persistent=False):
            _, stream = kernels_of(x, w, b)
    assert ks == [PERSISTENT], ks
    # The shift: each CTA reads it for its channels, the epilogue once per channel.
    gy = call.launches[0].grid[1]
    shift_bytes = C * (gy + 1) * x.element_size()
    assert call.read("input") == xbytes + shift_bytes, call.table(xbytes)
    assert call.written("output") == xbytes, call.table(xbytes)
    assert call.read("input") <= 1.02 * xbytes, call.table(xbytes)
    assert stream.read("input") >= 2 * xbytes, stream.table(xbytes)
    for l in call.launches:
        for t in l.tensors.values():
            if t.size < xbytes // 2:
                continue
            for d in (t.read, t.write):
                assert not d.accesses or d.sector_ratio <= 1.1, call.table(xbytes)
