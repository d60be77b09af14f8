"""python -m benchmarks.traffic: the global-memory traffic of fusedbn's CUDA ops, counted by the
CUDA emulation of the tests (tests/emu_testing.py traffic(); no GPU needed), for the benchmark's
cases at scaled-down shapes.

For each case (shape, dtype, layout) and op, one line per tensor: bytes read and written in units
of |x| (the bytes of the input) and the sectors per ideal sector of its warp-wide accesses (1.00:
as coalesced as the bytes asked for allow), then the total over the bulk tensors beside the floor
of benchmarks/cases.py (MIN_TRAFFIC). Shapes are the benchmark's with N*spatial divided by
--scale (N first, then H and W), on an emulated GPU of 132 / scale SMs, so that every block gets
the share of the tensor it gets on an H100 at full size.

    python -m benchmarks.traffic                           # the `main` set, float32 + bfloat16
    python -m benchmarks.traffic --shapes quick --ops fwd,bwd --dtypes bfloat16
"""
import argparse
import math
import os
import sys

import torch

from . import cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

EPS = 1e-5
RELU = 1
# op name -> (the op of emu_testing.counted_op, what it runs, the floor in |x|)
OPS = {
    "fwd": ("forward_train", "forward_train", cases.MIN_TRAFFIC["fwd"]),
    "infer": ("forward_eval", "forward_eval", cases.MIN_TRAFFIC["infer"]),
    "bwd": ("backward", "backward", cases.MIN_TRAFFIC["bwd"]),
    "act_fwd": ("act_forward_train", "act_forward_train relu, mask", cases.MIN_TRAFFIC["fwd"]),
    "act_bwd": ("act_backward", "act_backward from the mask", cases.MIN_TRAFFIC["bwd"]),
    "act_bwd_dr": ("act_backward_dr", "act_backward from the mask, with grad_residual",
                   cases.MIN_TRAFFIC["bwd"] + 1),
}


def scaled(shape, scale):
    """shape with N * spatial divided by `scale` (N first, then the spatial sizes)."""
    shape = list(shape)
    left = scale
    g = math.gcd(shape[0], left)
    shape[0] //= g
    left //= g
    for i in range(2, len(shape)):
        while left > 1 and shape[i] % 2 == 0 and left % 2 == 0:
            shape[i] //= 2
            left //= 2
    if left > 1:
        shape[0] = max(1, shape[0] // left)
    return tuple(shape)


def describe(call, xbytes):
    lines = []
    for t in sorted(call.tensors.values(), key=lambda t: (-t.size, t.name)):
        if t.moved < 0.005 * xbytes:  # the per-channel tensors
            continue
        lines.append("    %-14s %5.2f |x| read  %5.2f |x| written   sectors/ideal %4.2f read  %4.2f"
                     " written" % (t.name, t.read.bytes / xbytes, t.write.bytes / xbytes,
                                   t.read.sector_ratio, t.write.sector_ratio))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="main", help="shape sets of benchmarks/cases.py")
    p.add_argument("--scale", type=int, default=16, help="N*spatial divisor (and SM divisor)")
    p.add_argument("--ops", default=",".join(OPS), help="of: " + ", ".join(OPS))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="contiguous,channels_last")
    args = p.parse_args(argv)

    import fusedbn  # noqa: F401  (the CPU ops make the backward's inputs)
    from emu_testing import counted_op, emu_config

    shapes = []
    for name in cases.expand_shape_sets(args.shapes.split(",")):
        shapes += [s for s in cases.SHAPE_SETS[name] if s not in shapes]
    sms = max(1, round(132 / args.scale))
    print("fusedbn CUDA traffic, counted by the emulator: shapes / %d (N * spatial), %d SMs"
          % (args.scale, sms))
    for shape in shapes:
        small = scaled(shape, args.scale)
        for dname in args.dtypes.split(","):
            dtype = cases.DTYPES[dname]
            for fmt in args.layouts.split(","):
                if fmt == "channels_last" and len(small) != 4:
                    continue
                x = torch.randn(small).to(dtype)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                xbytes = x.numel() * x.element_size()
                print("\n%s (from %s) %s %s, |x| = %d B" % (
                    "x".join(map(str, small)), "x".join(map(str, shape)), dname, fmt, xbytes))
                for op in args.ops.split(","):
                    name, what, floor = OPS[op]
                    with emu_config(sm_count=sms, blocks_per_sm=0):
                        call = counted_op(name, x, torch.randn_like(x), act=RELU, eps=EPS)
                    bulk = call.total(big=xbytes // 2) / xbytes
                    print("  %-10s %-44s %5.2f |x| over the bulk tensors (floor %d): %s" % (
                        op, what, bulk, floor, " -> ".join(call.kernels())))
                    print("\n".join(describe(call, xbytes)))


if __name__ == "__main__":
    main()
