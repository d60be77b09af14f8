"""FusedBatchNormAct1d/2d/3d against the unfused torch sequence act(nn.BatchNorm(x) + r) in the same
dtypes and in float64: outputs, grad_input, grad_weight, grad_bias, grad_residual and the running
statistics, over dtypes x parameter dtypes x layouts x shapes (train), every activation with and
without a residual (train and eval), and memory-saving mode. The comparison rule is bn_testing's
(see act_testing.py for the scales and the memory-saving recovery bound)."""
import pytest
import torch

from act_testing import ACTS, ActTrio, check_act_step
from bn_testing import (DTYPE_PAIRS, FLOAT_DTYPES, dtype_pair_id, in_layout, is_channels_last,
                        layout_applies, random_values)

SHAPES = [
    (4, 3, 5, 6),      # 2d
    (1, 3, 4, 5),      # N = 1 with spatial > 1
    (3, 7, 5, 3),      # odd C and odd spatial size 15 (mask bytes cross planes)
    (5, 10, 13, 11),   # spatial 143: vector tails
    (37, 33),          # BatchNorm1d on (N, C), odd C
    (4, 6, 9),         # BatchNorm1d on (N, C, L)
    (2, 3, 3, 4, 5),   # 3d
]
LAYOUTS = ("contiguous", "channels_last", "sliced_channels", "permuted")
CASES = [(s, l) for s in SHAPES for l in LAYOUTS if layout_applies(l, len(s))]
CASE_IDS = ["x".join(map(str, s)) + "-" + l for s, l in CASES]


def inputs(shape, dtype, layout, device, residual, residual_layout=None):
    x = in_layout(random_values(shape), dtype, layout, device)
    dy = in_layout(random_values(shape), dtype, layout, device)
    r = (in_layout(random_values(shape), dtype, residual_layout or layout, device)
         if residual else None)
    return x, r, dy


@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_relu_parity_train(device, dtypes, shape, layout, residual):
    """BN + ReLU and BN + add + ReLU, two training steps, every dtype pair, layout and shape."""
    trio = ActTrio(len(shape), shape[1], *dtypes, device, "relu").train()
    for step in range(2):
        x, r, dy = inputs(shape, dtypes[0], layout, device, residual)
        y, dx = check_act_step(trio, x, r, dy, "step %d: " % step)
        if layout == "channels_last" and x.dim() == 4:
            assert is_channels_last(y) and is_channels_last(dx)
        if layout == "contiguous":
            assert y.is_contiguous() and dx.is_contiguous()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_channels"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_every_activation(device, act, dtype, layout, residual, train):
    shape = (3, 5, 6, 7)
    pdt = torch.float32 if dtype != torch.float64 else dtype
    trio = ActTrio(4, 5, dtype, pdt, device, act).train(train)
    x, r, dy = inputs(shape, dtype, layout, device, residual)
    check_act_step(trio, x, r, dy)


@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last", "permuted"])
def test_residual_in_another_layout(device, residual_layout):
    """The residual is read at the input's offsets whatever its own strides are."""
    trio = ActTrio(4, 6, torch.float32, torch.float32, device, "relu").train()
    x, r, dy = inputs((3, 6, 5, 4), torch.float32, "channels_last", device, True, residual_layout)
    check_act_step(trio, x, r, dy)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_memory_saving(device, act, dtype, layout, residual, train):
    """Memory-saving mode: identity / leaky_relu recover x_hat from the output (within the
    recovery bound of act_testing.py), relu keeps x and a bit mask (exact as usual)."""
    pdt = torch.float32 if dtype != torch.float64 else dtype
    trio = ActTrio(4, 6, dtype, pdt, device, act, memory_saving=True).train(train)
    for step in range(2):
        x, r, dy = inputs((4, 6, 5, 7), dtype, layout, device, residual)
        check_act_step(trio, x, r, dy, "step %d: " % step)


OPTIONS = {
    "momentum_None": dict(momentum=None),
    "affine_False": dict(affine=False),
    "bias_False": dict(bias=False),
    "track_running_stats_False": dict(track_running_stats=False),
    "eps_0.1": dict(eps=0.1),
}


@pytest.mark.parametrize("memory_saving", [False, True], ids=["normal", "memory_saving"])
@pytest.mark.parametrize("option", OPTIONS)
def test_module_options(device, option, memory_saving):
    """nn.BatchNorm's options through train, eval, train steps (running statistics each time)."""
    trio = ActTrio(4, 5, torch.float32, torch.float32, device, "leaky_relu",
                   memory_saving=memory_saving, **OPTIONS[option])
    for step, mode in enumerate([True, False, True]):
        trio.train(mode)
        x, r, dy = inputs((4, 5, 3, 3), torch.float32, "contiguous", device, step != 1)
        check_act_step(trio, x, r, dy, "step %d: " % step)
