"""The detectors of the CUDA emulation, each proven by a deliberately broken kernel
(csrc/cuda/emu/broken_kernels.cpp): the test asserts the specific error the emulator raises (or,
for the poison and ordering checks, the values the kernel produces); correct kernels run clean.
"""
import math
import re

import pytest
import torch

import fusedbn  # noqa: F401
from emu_testing import emu_config, emu_module, emu_ops, require_emu


@pytest.fixture(scope="module")
def emu():
    require_emu()
    return emu_module()


# name -> the error it must raise (a regular expression over the message)
BROKEN = {
    "write_race": r"shared-memory race: thread \(\d+, 0, 0\) writes 's' \+ \d+ that thread "
                  r"\(\d+, 0, 0\) wrote since the last __syncthreads",
    "missing_barrier": r"shared-memory race: thread \(\d+, 0, 0\) (writes|reads) 's' \+ \d+ that "
                       r"thread \(\d+, 0, 0\) (read|wrote) since the last __syncthreads",
    "divergent_barrier": r"divergent barrier: thread .* waits at __syncthreads "
                         r"\(csrc/cuda/emu/broken_kernels.cpp:\d+\) but thread .* waits at "
                         r"__syncthreads \(csrc/cuda/emu/broken_kernels.cpp:\d+\)",
    "shfl_mask_missing_caller": r"__shfl_down_sync at .*: thread \((1[6-9]|2\d|3[01]), 0, 0\) "
                                r"\(lane \d+\) calls it with mask 0x0000ffff, which does not name "
                                r"the calling lane",
    "shfl_mask_exited_lane": r"__shfl_down_sync .* with mask 0xffffffff .*: "
                             r"lane (1[6-9]|2\d|3[01]) named in the mask has exited",
    "shfl_mask_disagree": r"named in the mask calls it with mask 0x(ffff0000|ffffffff) \(the "
                          r"lanes of a shuffle must agree on the mask\)",
    "static_overrun": r"thread \(64, 0, 0\): shared-memory overrun: write of 4 bytes at 's' \+ 256 "
                      r"\(the array has 256 bytes\), outside every shared array",
    "static_overrun_indexed": r"thread \(64, 0, 0\): undefined behaviour: index 64 out of bounds "
                              r"for type 'float \[64\]'",
    "dynamic_overrun": r"shared-memory overrun: read of 4 bytes at dynamic shared memory \+ 128 "
                       r"\(the launch has 128 bytes\)",
    "misaligned_vector": r"misaligned vector access: load_vec of 16 bytes at 0x[0-9a-f]+, which is "
                         r"not 16-byte aligned",
    "misaligned_ubsan": r"undefined behaviour: misaligned address 0x[0-9a-f]+ for type "
                        r"'const struct Vec', which requires 16-byte alignment",
    "index_overflow": r"undefined behaviour: signed integer overflow in an addition at "
                      r"csrc/cuda/emu/broken_kernels.cpp:\d+",
    "grid_y_too_large": r"grid \(1, 65536, 1\).*invalid configuration argument: grid dimensions "
                        r"exceed \(2\^31 - 1, 65535, 65535\)",
    "too_many_threads": r"block \(32, 33, 1\).*more than 1024 threads per block",
    "block_z_too_large": r"block \(1, 1, 65\).*block dimensions exceed \(1024, 1024, 64\)",
    "zero_grid": r"a zero grid or block dimension",
    "launch_bounds_exceeded": r"launch of .*bounded_kernel.* with grid \(1, 1, 1\), block \(256, 1, "
                              r"1\).*too many resources requested for launch: 256 threads per "
                              r"block, more than the kernel's __launch_bounds__\(128\)",
    "static_shared_too_large": r"static shared memory: 's' \(65536 bytes\) brings the kernel's "
                               r"static shared memory to 65536 bytes, more than CUDA's 48 KB",
    "dynamic_shared_without_opt_in": r"65536 bytes of dynamic shared memory: too much dynamic "
                                     r"shared memory: more than 48 KB needs "
                                     r"set_max_dynamic_shared_memory",
    "dynamic_shared_over_opt_in": r"98304 bytes of dynamic shared memory: too much dynamic shared "
                                  r"memory: more than the 65536 bytes the kernel opted in to",
    # cooperative launches and the grid barrier
    "cooperative_too_large": r"cooperative launch of .*grid_sync_kernel.* with grid \(5, 1, 1\).*"
                             r"too many blocks in cooperative launch "
                             r"\(cudaErrorCooperativeLaunchTooLarge\): 5 blocks, but at most 4 "
                             r"can be resident \(2 SMs x 2 blocks per SM\)",
    "grid_sync_not_cooperative": r"thread \(\d+, 0, 0\): grid barrier "
                                 r"\(csrc/cuda/emu/broken_kernels.cpp:\d+\) in a launch that is "
                                 r"not cooperative: this_grid\(\).sync\(\) needs "
                                 r"cudaLaunchCooperativeKernel",
    "grid_sync_thread_exits": r"block \(1, 0, 0\): thread \(5, 0, 0\) has exited while thread "
                              r"\(\d+, 0, 0\) waits at the grid barrier "
                              r"\(csrc/cuda/emu/broken_kernels.cpp:\d+\): the grid barrier waits "
                              r"for every thread of the grid, so on a GPU this deadlocks",
    "grid_sync_block_exits": r"grid: block \(2, 0, 0\) has exited while block \(\d, 0, 0\) "
                             r"thread \(\d+, 0, 0\) waits at the grid barrier .*deadlocks",
    "grid_sync_divergent": r"grid: divergent grid barriers: block \(\d, 0, 0\) thread "
                           r"\(\d+, 0, 0\) waits at the grid barrier "
                           r"\(csrc/cuda/emu/broken_kernels.cpp:(\d+)\) but block \(\d, 0, 0\) "
                           r"thread \(\d+, 0, 0\) waits at the grid barrier "
                           r"\(csrc/cuda/emu/broken_kernels.cpp:(?!\1)\d+\)",
    "grid_sync_vs_syncthreads": r"block \(0, 0, 0\): divergent barrier: thread \(0, 0, 0\) waits "
                                r"at __syncthreads .* but thread \(\d+, 0, 0\) waits at the grid "
                                r"barrier",
    "grid_race": r"block \(3, 0, 0\): shared-memory race: thread \(\d+, 0, 0\) writes 's' \+ \d+ "
                 r"that thread \(\d+, 0, 0\) wrote since the last __syncthreads",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("seed", [1, 2])
def test_broken_kernel_is_caught(emu, name, seed):
    with emu_config(seed=seed):
        with pytest.raises(RuntimeError, match=BROKEN[name]) as info:
            emu.run_broken_kernel(name)
    assert "fusedbn_emu: " in str(info.value)


def test_every_broken_kernel_has_a_test(emu):
    controls = {"block_sum_ok", "dynamic_shared_with_opt_in_ok", "partial_warp",
                "uninitialized_shared", "order_dependent", "launch_bounds_ok",
                "launch_bounds_read", "grid_exchange_ok", "cooperative_refused"}
    assert set(emu.broken_kernel_names()) == set(BROKEN) | controls


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_correct_block_reduction_runs_clean(emu, seed):
    with emu_config(seed=seed):
        assert emu.run_broken_kernel("block_sum_ok") == [sum(range(256))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grid_barrier_exchanges_through_global_memory(emu, seed):
    """A cooperative grid of 6 co-resident blocks: each block's sum written before the grid
    barrier is read by every block after it (each gets the grid's total), and each block's static
    and dynamic shared memory still holds what that block wrote (private per block)."""
    total = float(sum(i % 97 for i in range(6 * 64)))
    with emu_config(seed=seed):
        before = emu.stats()
        out = emu.run_broken_kernel("grid_exchange_ok")
    assert out == [total, 1.0] * 6
    assert emu.stats()["blocks"] - before["blocks"] == 6


def test_cooperative_launch_refuses_a_grid_that_cannot_be_co_resident(emu):
    """launch_cooperative (launch.cuh) checks sm_count x blocks_per_sm first: 4 blocks on 2 SMs x 2
    launch, 5 are refused (false, nothing launched: the caller falls back)."""
    assert emu.run_broken_kernel("cooperative_refused") == [1.0, 0.0]


def test_launch_within_bounds_runs(emu):
    assert emu.run_broken_kernel("launch_bounds_ok") == [2.0 * t for t in range(128)]


def test_launch_bounds_are_read(emu):
    """The emulator reads __launch_bounds__ from the compiled kernel: none (0), a test kernel's 128,
    and kBlockThreads (256) of a reduction kernel of the real sources."""
    assert emu.run_broken_kernel("launch_bounds_read") == [0.0, 128.0, 256.0]


def test_opt_in_dynamic_shared_memory_runs(emu):
    assert emu.run_broken_kernel("dynamic_shared_with_opt_in_ok") == [3.0] * 32


def test_partial_warp_reads_poison(emu):
    # 48 threads, shfl_down by 8: lanes 8..15 of the 16-lane second warp read lanes 16..23, which
    # do not exist -> poison (NaN); every other lane reads its neighbour 8 up (or itself past 32).
    out = emu.run_broken_kernel("partial_warp")
    for t, v in enumerate(out):
        lane, warp = t % 32, t // 32
        if warp == 1 and lane >= 8:
            assert math.isnan(v), (t, v)
        elif lane + 8 < 32:
            assert v == t + 8, (t, v)
        else:
            assert v == t, (t, v)


def test_uninitialized_shared_memory_reads_nan(emu):
    assert all(math.isnan(v) for v in emu.run_broken_kernel("uninitialized_shared"))


def test_seeds_expose_order_dependence(emu):
    """A kernel whose result depends on the order of its threads gives different results under
    different seeds -- what the two-seed comparison of the op tests relies on."""
    results = set()
    for seed in range(1, 6):
        with emu_config(seed=seed):
            results.add(emu.run_broken_kernel("order_dependent")[0])
    assert len(results) > 1


def test_unknown_broken_kernel(emu):
    with pytest.raises(RuntimeError, match="no broken kernel named 'nope'"):
        emu.run_broken_kernel("nope")


# ---- the op wrapper: fresh outputs poisoned, inputs guarded ---------------------------------

def test_fresh_output_is_poisoned(emu):
    """A kernel that writes every other element leaves NaN in the others (fresh allocations of an
    emulated op are 0xff bytes)."""
    out = emu.run_tensor_kernel("unwritten_output", torch.zeros(100))
    assert (out[0::2] == 1).all()
    assert torch.isnan(out[1::2]).all()


def test_read_past_a_tensor_reads_nan(emu):
    out = emu.run_tensor_kernel("read_past_end", torch.arange(50, dtype=torch.float32))
    torch.testing.assert_close(out[:-1], torch.arange(1, 50, dtype=torch.float32))
    assert torch.isnan(out[-1])


def test_write_past_a_tensor_is_caught(emu):
    with pytest.raises(RuntimeError, match="a kernel wrote past the end of a 400-byte allocation"):
        emu.run_tensor_kernel("write_past_end", torch.zeros(100))


def test_write_to_a_read_only_input_is_caught(emu):
    x = torch.zeros(8)
    with pytest.raises(RuntimeError, match="wrote to its argument 0, which it may only read"):
        emu.run_tensor_kernel("write_input", x)
    assert (x == 0).all()


def test_op_may_not_write_its_inputs(emu):
    """update_running_stats writes its first two arguments in place (declared); the values reach
    the caller's tensors through the guarded copies."""
    ops = emu_ops()
    rm, rv = torch.zeros(3), torch.ones(3)
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    ops.update_running_stats(rm, rv, mean, var, 5, 0.5, None)
    torch.testing.assert_close(rm, mean * 0.5)
    torch.testing.assert_close(rv, 0.5 + 0.5 * var * 5 / 4)
