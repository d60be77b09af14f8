"""First check of the emulated CUDA op library: forward_train's statistics and output against the
CPU op in every layout path of the reduction (planes, packed small planes, channels-last rows,
(N, C)). The full coverage is in test_cuda_emu_ops.py."""
import pytest
import torch

import fusedbn  # noqa: F401  (registers torch.ops.fusedbn)
from emu_testing import emu_ops, require_emu


@pytest.mark.parametrize("shape,channels_last", [
    ((4, 3, 7, 7), False), ((8, 5), False), ((4, 8, 5, 5), True), ((2, 3, 40, 40), False)])
def test_forward_train_matches_cpu(shape, channels_last):
    require_emu()
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    got = emu_ops().forward_train(x, w, b, 1e-5)
    want = torch.ops.fusedbn.forward_train(x, w, b, 1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert got[0].stride() == x.stride()


def test_rule_float32_excess_is_xfail_but_gross_error_fails():
    """assert_rule: a float32 output just over the bound (float32 CUDA sums against the CPU op's
    float64 ones) is an expected failure; a gross error still fails; float64 stays strict."""
    import numpy as np
    from _pytest.outcomes import XFailed

    from emu_reference import LD, assert_rule

    ref = np.array([1.0, 2.0, 3.0], dtype=LD)
    cpu32 = torch.tensor([1.0, 2.0, 3.0])
    near32 = cpu32 * (1 + 8 * torch.finfo(torch.float32).eps)
    with pytest.raises(XFailed, match="float32 CUDA accumulation"):
        assert_rule("x", near32, cpu32, ref)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_rule("x", cpu32 * 1.5, cpu32, ref)
    cpu64 = cpu32.double()
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_rule("x", cpu64 * (1 + 8 * torch.finfo(torch.float64).eps), cpu64, ref)
