"""What is measured: shape sets, benchmark cases and their inputs.

A *case* is one (shape, dtype, layout, mode); every provider is timed on the same case, with the
same input tensors, in the same process. Shapes are (N, C, H, W) for BatchNorm2d, (N, C) for
BatchNorm1d.
"""
import itertools
from dataclasses import dataclass

import torch

MODES = ("fwd", "bwd", "fwdbwd", "infer")
MODE_HELP = {
    "fwd": "training forward (batch statistics, running-stat update, autograd recording)",
    "bwd": "backward only (the forward runs before each repeat, outside the timed region)",
    "fwdbwd": "training forward + backward",
    "infer": "eval forward (running statistics) under torch.no_grad",
}
# Minimal traffic in units of |x| (the bytes of x): the floor a single-pass kernel can reach.
MIN_TRAFFIC = {"fwd": 2, "infer": 2, "bwd": 3, "fwdbwd": 5}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("nchw", "channels_last")

_RESNET50 = ((64, 112), (64, 56), (256, 56), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7))
_EFFICIENTNET = ((96, 112), (144, 56), (672, 14), (1152, 7))

SHAPE_SETS = {
    "resnet50": [(n, c, hw, hw) for n in (256, 32) for c, hw in _RESNET50],
    "efficientnet": [(128, c, hw, hw) for c, hw in _EFFICIENTNET],
    "unet": [(8, 64, 256, 256), (8, 1024, 16, 16)],
    "smallc": [(20, 6, 256, 256)],
    "bn1d": [(3136, 256)],
    # The CPU set (the default on the CPU): ResNet-like layers that a CPU trains in seconds.
    "cpu": [(32, 64, 56, 56), (8, 64, 112, 112), (32, 256, 14, 14), (32, 512, 7, 7)],
    # Smoke test for CI and --quick: one small image layer and one BatchNorm1d.
    "quick": [(8, 64, 28, 28), (512, 256)],
}
# Names that stand for several sets.
SHAPE_GROUPS = {
    "gpu": ("resnet50", "efficientnet", "unet", "smallc", "bn1d"),
    "all": tuple(SHAPE_SETS),
}


def default_shape_sets(device_type):
    """The shape sets run when --shapes is not given."""
    return ["cpu"] if device_type == "cpu" else list(SHAPE_GROUPS["gpu"])


def expand_shape_sets(names):
    """Resolves set and group names (see SHAPE_SETS, SHAPE_GROUPS) into set names, in order."""
    out = []
    for name in names:
        if name in SHAPE_GROUPS:
            out.extend(SHAPE_GROUPS[name])
        elif name in SHAPE_SETS:
            out.append(name)
        else:
            known = ", ".join(list(SHAPE_SETS) + list(SHAPE_GROUPS))
            raise ValueError("unknown shape set %r (known: %s)" % (name, known))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Case:
    """One benchmark case; the same for every provider."""

    shape_set: str
    shape: tuple
    dtype: str
    layout: str
    mode: str

    @property
    def shape_label(self):
        return "x".join(str(d) for d in self.shape)

    @property
    def label(self):
        return "%s %s %s %s" % (self.shape_label, self.dtype, self.layout, self.mode)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def x_bytes(self):
        return self.numel * self.torch_dtype.itemsize

    @property
    def min_bytes(self):
        """The floor on memory traffic for this mode (see MIN_TRAFFIC)."""
        return MIN_TRAFFIC[self.mode] * self.x_bytes

    @property
    def memory_format(self):
        if self.layout == "nchw":
            return torch.contiguous_format
        return {4: torch.channels_last, 5: torch.channels_last_3d}[len(self.shape)]

    def key(self):
        """The fields that identify the case in the JSON results."""
        return {"set": self.shape_set, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout, "mode": self.mode}


def layout_applies(shape, layout):
    """channels_last exists only for 4-D (and 5-D) inputs; BatchNorm1d runs contiguous only."""
    return layout == "nchw" or len(shape) in (4, 5)


def make_cases(shape_sets, dtypes, layouts, modes):
    """All cases, modes innermost so that each provider's state (a compiled graph) is reused."""
    cases = []
    for name in shape_sets:
        for shape, dtype, layout in itertools.product(SHAPE_SETS[name], dtypes, layouts):
            if layout_applies(shape, layout):
                cases.extend(Case(name, tuple(shape), dtype, layout, m) for m in modes)
    return cases


@dataclass
class Inputs:
    """The tensors of one case, shared by every provider: x (requires grad), dy, and the initial
    parameters and running statistics that each provider's module copies."""

    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def make_inputs(case, device, seed=0):
    """Random inputs for the case on the device: x with a per-channel mean and scale (so that the
    statistics are not trivial), a random dy, float32 parameters (as under AMP)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    c = case.shape[1]
    bshape = (1, c) + (1,) * (len(case.shape) - 2)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    x = randn(*case.shape).mul_(1.0 + randn(*bshape).abs()).add_(randn(*bshape))
    dy = randn(*case.shape)
    fmt, dt = case.memory_format, case.torch_dtype
    x = x.to(dtype=dt, memory_format=fmt).requires_grad_(True)
    dy = dy.to(dtype=dt, memory_format=fmt)
    return Inputs(x=x, dy=dy, weight=1.0 + 0.1 * randn(c), bias=0.1 * randn(c),
                  running_mean=0.1 * randn(c), running_var=1.0 + 0.1 * randn(c).abs())
