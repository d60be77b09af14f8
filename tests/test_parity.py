"""Module parity: fusedbn.FusedBatchNorm{1,2,3}d against nn.BatchNorm{1,2,3}d (same dtypes) and a
float64 torch reference, over dtypes x parameter dtypes x layouts x shapes, and over the module
options (momentum, affine, bias, track_running_stats, eps) through several training steps.
The comparison rule is described in bn_testing.py."""
import pytest
import torch

from bn_testing import (DTYPE_PAIRS, LAYOUTS, Trio, check_trio_step,
                        dtype_pair_id, in_layout, is_channels_last, layout_applies, random_values)

SHAPES = [
    (4, 3, 5, 6),      # 2d, the basic case
    (1, 3, 4, 5),      # N = 1 with spatial > 1
    (8, 1, 3, 3),      # C = 1
    (3, 7, 5, 3),      # C = 7, odd spatial size 15
    (2, 33, 4, 4),     # C = 33
    (5, 10, 13, 11),   # spatial 143: vector tails
    (2, 100, 5, 3),    # C = 100: channels-last rows wide enough to be streamed, vector tails
    (16, 5),           # BatchNorm1d on (N, C)
    (37, 33),          # BatchNorm1d on (N, C), C = 33 and N not a power of two
    (40, 70),          # BatchNorm1d on (N, C), wide rows (streamed), vector tails
    (4, 6, 9),         # BatchNorm1d on (N, C, L)
    (2, 3, 3, 4, 5),   # 3d
]

CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS
         if layout_applies(layout, len(shape))]


def check_formats(layout, x, y, dx):
    """Output and grad_input keep the input's memory format where torch does: contiguous stays
    contiguous, channels_last(_3d) stays channels_last(_3d)."""
    if layout == "contiguous":
        assert y.is_contiguous() and dx.is_contiguous()
    elif layout == "channels_last" and x.dim() in (4, 5):
        assert is_channels_last(y), "output lost channels_last: strides %s" % (y.stride(),)
        assert is_channels_last(dx), "grad_input lost channels_last: strides %s" % (dx.stride(),)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("shape,layout", CASES,
                         ids=["x".join(map(str, s)) + "-" + l for s, l in CASES])
def test_module_parity_train(device, dtypes, shape, layout):
    """Two training steps: output, all gradients and the running statistics after each."""
    input_dtype, param_dtype = dtypes
    trio = Trio(len(shape), shape[1], input_dtype, param_dtype, device).train()
    for step in range(2):
        x = in_layout(random_values(shape), input_dtype, layout, device)
        dy = in_layout(random_values(shape), input_dtype, layout, device)
        y, dx = check_trio_step(trio, x, dy, "train step %d: " % step)
        check_formats(layout, x, y, dx)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("shape,layout", CASES,
                         ids=["x".join(map(str, s)) + "-" + l for s, l in CASES])
def test_module_parity_eval(device, dtypes, shape, layout):
    """Eval mode with random running statistics: output and gradients; the statistics (and
    num_batches_tracked) stay as they were."""
    input_dtype, param_dtype = dtypes
    trio = Trio(len(shape), shape[1], input_dtype, param_dtype, device,
                num_batches_tracked=3).eval()
    x = in_layout(random_values(shape), input_dtype, layout, device)
    dy = in_layout(random_values(shape), input_dtype, layout, device)
    y, dx = check_trio_step(trio, x, dy, "eval: ")
    check_formats(layout, x, y, dx)


OPTIONS = {
    "default": dict(),
    "momentum_None": dict(momentum=None),
    "momentum_None_from_nbt_5": dict(momentum=None, num_batches_tracked=5),
    "momentum_0": dict(momentum=0.0),
    "momentum_1": dict(momentum=1.0),
    "eps_0.1": dict(eps=0.1),
    "affine_False": dict(affine=False),
    "bias_False": dict(bias=False),
    "track_running_stats_False": dict(track_running_stats=False),
    "no_affine_no_stats": dict(affine=False, track_running_stats=False),
}

# train/eval schedule: running statistics are checked after every step, including that eval steps
# leave them alone.
SCHEDULE = ["train", "train", "eval", "train", "train", "eval"]


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[0], DTYPE_PAIRS[1], DTYPE_PAIRS[6]],
                         ids=dtype_pair_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (10, 4, 7)], ids=["2d", "1d_NCL"])
def test_module_options_over_steps(device, option, dtypes, layout, shape):
    options = dict(OPTIONS[option])
    nbt = options.pop("num_batches_tracked", None)
    input_dtype, param_dtype = dtypes
    trio = Trio(len(shape), shape[1], input_dtype, param_dtype, device,
                num_batches_tracked=nbt, **options)
    for step, mode in enumerate(SCHEDULE):
        trio.train(mode == "train")
        x = in_layout(random_values(shape), input_dtype, layout, device)
        dy = in_layout(random_values(shape), input_dtype, layout, device)
        check_trio_step(trio, x, dy, "step %d (%s): " % (step, mode))


@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[1], DTYPE_PAIRS[0]], ids=dtype_pair_id)
def test_eval_mode_from_start(device, dtypes):
    """A module used in eval mode only (e.g. a loaded checkpoint): the random running statistics
    are used, never changed; gradients flow through the per-channel affine map."""
    input_dtype, param_dtype = dtypes
    shape = (3, 5, 4, 4)
    trio = Trio(4, 5, input_dtype, param_dtype, device, num_batches_tracked=7).eval()
    before = trio.fused.running_mean.clone(), trio.fused.running_var.clone()
    for _ in range(2):
        x = in_layout(random_values(shape), input_dtype, "contiguous", device)
        dy = in_layout(random_values(shape), input_dtype, "contiguous", device)
        check_trio_step(trio, x, dy, "eval: ")
    assert torch.equal(trio.fused.running_mean, before[0])
    assert torch.equal(trio.fused.running_var, before[1])
    assert int(trio.fused.num_batches_tracked) == 7


@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[0], DTYPE_PAIRS[5], DTYPE_PAIRS[6]],
                         ids=dtype_pair_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_parity_large_spatial(device, dtypes, layout):
    """(2, 3, 256, 256): 131072 values per channel, enough to exercise the multi-block / multi-
    thread reductions and their merge."""
    input_dtype, param_dtype = dtypes
    shape = (2, 3, 256, 256)
    trio = Trio(4, 3, input_dtype, param_dtype, device).train()
    x = in_layout(random_values(shape), input_dtype, layout, device)
    dy = in_layout(random_values(shape), input_dtype, layout, device)
    y, dx = check_trio_step(trio, x, dy, "train: ")
    check_formats(layout, x, y, dx)


def test_module_is_a_batchnorm():
    import fusedbn
    import torch.nn as nn
    for fused, plain in [(fusedbn.FusedBatchNorm1d, nn.BatchNorm1d),
                         (fusedbn.FusedBatchNorm2d, nn.BatchNorm2d),
                         (fusedbn.FusedBatchNorm3d, nn.BatchNorm3d)]:
        m = fused(4)
        assert isinstance(m, plain)
        p = plain(4)
        assert list(m.state_dict()) == list(p.state_dict())
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in p.named_parameters()]
        assert [n for n, _ in m.named_buffers()] == [n for n, _ in p.named_buffers()]
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (
            p.eps, p.momentum, p.affine, p.track_running_stats)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls_rank", [(1, 3), (2, 4), (3, 5)], ids=["1d", "2d", "3d"])
def test_modules_run_on_fusedbn_ops(device, training, cls_rank):
    """The modules and fusedbn.functional compute with torch.ops.fusedbn.* and never fall back to
    torch's own batch norm (which would make every parity test pass trivially)."""
    import fusedbn
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    kind, rank = cls_rank
    m = getattr(fusedbn, "FusedBatchNorm%dd" % kind)(3, device=device).train(training)
    x = torch.randn((4, 3) + (3,) * (rank - 2), device=device, requires_grad=True)
    with Recorder() as rec:
        m(x).sum().backward()
        fusedbn.functional.batch_norm(x.detach(), m.running_mean, m.running_var, m.weight,
                                      m.bias, training)
    ops = " ".join(rec.ops)
    # In training the eager path updates the running statistics in the forward's own op
    # (forward_train_update: on the CPU one kernel, elsewhere its composite).
    expected = "fusedbn.forward_train_update" if training else "fusedbn.forward_eval"
    assert expected in ops and "fusedbn.backward" in ops, ops
    assert "batch_norm" not in ops.replace("fusedbn.", ""), ops


def test_module_constructor_options():
    import fusedbn
    m = fusedbn.FusedBatchNorm2d(5, eps=1e-3, momentum=None, affine=True,
                                 track_running_stats=True, dtype=torch.float64, bias=False)
    assert m.eps == 1e-3 and m.momentum is None and m.bias is None
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    m = fusedbn.FusedBatchNorm3d(2, affine=False, track_running_stats=False)
    assert m.weight is None and m.bias is None and m.running_mean is None
    assert m.running_var is None and m.num_batches_tracked is None
    m = fusedbn.FusedBatchNorm1d(num_features=3, device="cpu", dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_channels"])
@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[0], DTYPE_PAIRS[1], DTYPE_PAIRS[6]],
                         ids=dtype_pair_id)
def test_cuda_matches_cpu(layout, dtypes):
    """The CUDA kernels against fusedbn's own CPU path on identical state and data: the CPU result
    plays torch's part in the rule, so CUDA may be as far from the float64 reference as fusedbn's
    CPU path is, plus the float32 tolerance."""
    import copy

    from bn_testing import assert_parity, forward_backward
    input_dtype, param_dtype = dtypes
    shape = (4, 6, 9, 7)
    trio = Trio(4, 6, input_dtype, param_dtype, "cpu")
    cpu, ref = trio.fused, trio.ref
    gpu = copy.deepcopy(cpu).cuda()
    for step in range(3):
        for m in (cpu, gpu, ref):
            m.train(step < 2)
        vals, dvals = random_values(shape), random_values(shape)
        x, dy = (in_layout(v, input_dtype, layout, "cpu") for v in (vals, dvals))
        xc, dyc = (in_layout(v, input_dtype, layout, "cuda") for v in (vals, dvals))
        expected = forward_backward(ref, x.double(), dy.double())
        ours_cpu = forward_backward(cpu, x, dy)
        ours_gpu = forward_backward(gpu, xc, dyc)
        for name, a, b, r in zip(["y", "dx", "dw", "db"], ours_gpu, ours_cpu, expected):
            assert_parity("step %d cuda vs cpu %s" % (step, name), a.cpu(), b, r)
        for name in ("running_mean", "running_var"):
            assert_parity("step %d cuda vs cpu %s" % (step, name), getattr(gpu, name).cpu(),
                          getattr(cpu, name), getattr(ref, name))
        assert torch.equal(gpu.num_batches_tracked.cpu(), cpu.num_batches_tracked)
