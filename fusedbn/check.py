"""Parity self-check: fusedbn against torch.nn on every device this build can use.

    python -m fusedbn.check

Trains FusedBatchNorm1d/2d/3d beside a copy of the nn module for a few steps in every dtype and
layout, compares outputs, gradients and running statistics, and prints a table. Exits 1 on a
mismatch. (The full parity suite is tests/; this is the quick look a user runs after install.)
"""
import copy
import sys

import torch
from torch import nn

from . import build_info, convert_batchnorm

# Largest |ours - torch| accepted, relative to the largest |torch| value of the tensor compared:
# float32/float64 agree to rounding; the half types to a few units in their last place.
_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_CASES = [
    ("1d (N,C)", nn.BatchNorm1d, (64, 24), None),
    ("1d (N,C,L)", nn.BatchNorm1d, (8, 24, 33), None),
    ("2d NCHW", nn.BatchNorm2d, (8, 24, 15, 15), torch.contiguous_format),
    ("2d channels_last", nn.BatchNorm2d, (8, 24, 15, 15), torch.channels_last),
    ("3d channels_last_3d", nn.BatchNorm3d, (4, 24, 5, 6, 7), torch.channels_last_3d),
]


def _rel_err(a, b):
    scale = b.detach().abs().max().item() or 1.0
    return (a.detach().double() - b.detach().double()).abs().max().item() / scale


def check_case(device, dtype, cls, shape, memory_format, steps=3):
    """Worst relative error over outputs, gradients and running statistics of a few train steps
    and one eval step."""
    torch.manual_seed(0)
    ref = cls(shape[1]).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = convert_batchnorm(copy.deepcopy(ref))
    worst = 0.0
    for _ in range(steps):
        x = (torch.randn(shape, device=device) * 2 + 1).to(dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        grad = torch.randn_like(yr)
        yr.backward(grad)
        yo.backward(grad)
        pairs = [(yo, yr), (xo.grad, xr.grad), (ours.weight.grad, ref.weight.grad),
                 (ours.bias.grad, ref.bias.grad), (ours.running_mean, ref.running_mean),
                 (ours.running_var, ref.running_var)]
        worst = max([worst] + [_rel_err(a, b) for a, b in pairs])
    ref.eval()
    ours.eval()
    with torch.no_grad():
        worst = max(worst, _rel_err(ours(x), ref(x)))
    return worst


def main():
    info = build_info()
    devices = ["cpu"] + (["cuda"] if "cuda" in info["backends"] and torch.cuda.is_available() else [])
    print(f"fusedbn {info['version']} (backends {', '.join(info['backends'])}, CPU kernels "
          f"{info['cpu_kernels']}) against torch {torch.__version__}")
    print(f"{'device':6s} {'dtype':9s} {'case':22s} {'max rel err':>12s}  result")
    failures = 0
    for device in devices:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for name, cls, shape, fmt in _CASES:
                err = check_case(device, dtype, cls, shape, fmt)
                ok = err <= _TOL[dtype]
                failures += not ok
                print(f"{device:6s} {str(dtype)[6:]:9s} {name:22s} {err:12.2e}  "
                      f"{'ok' if ok else 'MISMATCH'}")
    print("parity check: " + ("all cases agree with torch.nn" if not failures
                              else f"{failures} case(s) differ from torch.nn"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
