"""What is measured: shape sets, benchmark cases and their inputs.

A *case* is one (shape, dtype, layout, mode); every provider is timed on the same case, with the
same input tensors, in the same process. Shapes are (N, C) or (N, C, L) for BatchNorm1d,
(N, C, H, W) for BatchNorm2d, (N, C, D, H, W) for BatchNorm3d.

A case's layout says what the tensor is: ``nc``, ``ncl``, ``nchw``, ``ncdhw`` (contiguous) or
``channels_last``, ``channels_last_3d``. --layouts selects by these names or by the two memory
formats ``contiguous`` and ``channels_last`` (which takes channels_last_3d too). Results files
written before these names labelled every contiguous case ``nchw``; normalize_layout reads them.
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
# The memory formats a sweep can ask for, and the layout label of each per input rank.
MEMORY_FORMATS = ("contiguous", "channels_last")
_LABELS = {
    ("contiguous", 2): "nc", ("contiguous", 3): "ncl", ("contiguous", 4): "nchw",
    ("contiguous", 5): "ncdhw", ("channels_last", 4): "channels_last",
    ("channels_last", 5): "channels_last_3d",
}
# Every layout label, in the order tables list them.
LAYOUTS = ("nc", "ncl", "nchw", "channels_last", "ncdhw", "channels_last_3d")
_FORMAT_OF = {label: fmt for (fmt, _), label in _LABELS.items()}

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
    # The main job's short run (scripts/run.sh, --preset main): a large and a small-plane image
    # layer (NCHW and channels_last) and a BatchNorm1d over features.
    "main": [(32, 64, 56, 56), (32, 256, 14, 14), (4096, 256)],
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
        if _FORMAT_OF[self.layout] == "contiguous":
            return torch.contiguous_format
        return {4: torch.channels_last, 5: torch.channels_last_3d}[len(self.shape)]

    def key(self):
        """The fields that identify the case in the JSON results."""
        return {"set": self.shape_set, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout, "mode": self.mode}


def layout_label(ndim, memory_format):
    """The label of a `memory_format` ('contiguous' or 'channels_last') tensor of `ndim`
    dimensions, or None where the format does not exist (channels_last of (N, C) or (N, C, L))."""
    return _LABELS.get((memory_format, ndim))


def normalize_layout(shape, layout):
    """The label of a record's layout, also for results files that called every contiguous case
    'nchw' and a 5-D channels_last_3d case 'channels_last'."""
    if layout in ("nchw", "channels_last") and len(shape) != 4:
        return layout_label(len(shape), _FORMAT_OF[layout]) or layout
    return layout


def check_layouts(names):
    """The names --layouts accepts (memory formats and labels); returns the unknown ones."""
    return [n for n in names if n not in MEMORY_FORMATS and n not in LAYOUTS]


def make_cases(shape_sets, dtypes, layouts, modes):
    """All cases, modes innermost so that each provider's state (a compiled graph) is reused.
    `layouts` selects memory formats ('contiguous', 'channels_last') and/or layout labels."""
    cases = []
    for name in shape_sets:
        for shape, dtype, fmt in itertools.product(SHAPE_SETS[name], dtypes, MEMORY_FORMATS):
            label = layout_label(len(shape), fmt)
            if label and (fmt in layouts or label in layouts):
                cases.extend(Case(name, tuple(shape), dtype, label, m) for m in modes)
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
