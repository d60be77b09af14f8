"""python -m benchmarks.traffic: the global-memory traffic of fusedbn's CUDA ops, counted by the
CUDA emulation of the tests (tests/emu_testing.py traffic(); no GPU needed), for the benchmark's
cases at scaled-down shapes.

For each case (shape, dtype, layout) and op, one line per tensor: bytes read and written in units
of |x| (the bytes of the input) and the sectors per ideal sector of its warp-wide accesses (1.00:
as coalesced as the bytes asked for allow), then the total over the bulk tensors beside the floor
of benchmarks/cases.py (MIN_TRAFFIC). Shapes are the benchmark's with N*spatial divided by
--scale (N first, then H and W), on an emulated GPU of 132 / scale SMs, so that every block gets
the share of the tensor it gets on an H100 at full size.

With --scale auto, each shape gets the smallest power-of-two scale >= 16 that leaves at most
--max-elements elements (at least 1 SM: the largest shapes' blocks then get more than their
share, which changes the grid, not the bytes per tensor).

    python -m benchmarks.traffic                           # the `main` set, float32 + bfloat16
    python -m benchmarks.traffic --shapes quick --ops fwd,bwd --dtypes bfloat16
    python -m benchmarks.traffic --commit-results          # benchmarks/results/traffic.json

--commit-results writes the counts of the GPU benchmark's cases, which `python -m benchmarks`
(its report, the README's Performance section) prints beside time and eta of CUDA results as
"counted |x|" (benchmarks/report.py). Regenerate it whenever a CUDA kernel changes.
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


def auto_scale(shape, limit):
    """The smallest power of two >= 16 that brings shape's elements down to `limit`."""
    n = math.prod(shape)
    scale = 16
    while n // scale > limit and scale < n:
        scale *= 2
    return scale


def count_case(shape, dname, fmt, ops, scale, counted_op, emu_config):
    """Counts `ops` on `shape` scaled by `scale`: one record per op (see RESULTS_DOC)."""
    small = scaled(shape, scale)
    x = torch.randn(small).to(cases.DTYPES[dname])
    if fmt == "channels_last":
        x = x.contiguous(memory_format={4: torch.channels_last,
                                        5: torch.channels_last_3d}[len(small)])
    xbytes = x.numel() * x.element_size()
    sms = max(1, round(132 / scale))
    out = []
    for op in ops:
        name, what, floor = OPS[op]
        with emu_config(sm_count=sms, blocks_per_sm=0):
            call = counted_op(name, x, torch.randn_like(x), act=RELU, eps=EPS)
        # The bulk tensors: the op's own of at least |x| / 2 (x, y, dy, dx, a mask...); at a
        # scaled-down shape the partials of a many-channel layer may reach that size too, which
        # they do not at full size: counted apart (workspace_x).
        bulk = [t for t in call.tensors.values()
                if t.size >= xbytes // 2 and t.role != "workspace"]
        out.append({
            "shape": list(shape), "scaled": list(small), "sms": sms, "dtype": dname,
            "layout": cases.layout_label(len(shape), fmt), "op": op, "what": what,
            "floor": floor, "x_bytes": xbytes,
            "bulk_x": sum(t.moved for t in bulk) / xbytes,
            "workspace_x": sum(t.moved for t in call.tensors.values()
                               if t.role == "workspace") / xbytes,
            "total_x": call.total() / xbytes,
            "sector_ratio": max([max(t.read.sector_ratio, t.write.sector_ratio) for t in bulk]
                                or [1.0]),
            "kernels": call.kernels(), "tensors": describe(call, xbytes)})
    return out


# The document --json / --commit-results write: {"schema", "env": {commit, torch}, "config",
# "records"}; a record is one (case, op): the full shape and the scaled one it was counted at
# (on `sms` emulated SMs), bulk_x = bytes moved over the op's bulk tensors (its arguments and
# outputs of at least half of |x|) per |x|, workspace_x = over its workspaces (partials),
# total_x = over everything, sector_ratio = the worst sectors per ideal sector of the bulk
# tensors' warp accesses.
RESULTS_DOC = os.path.join(ROOT, "benchmarks", "results", "traffic.json")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="main", help="shape sets of benchmarks/cases.py")
    p.add_argument("--scale", default="16",
                   help="N*spatial divisor (and SM divisor), or auto: per shape, the smallest "
                        "power of two >= 16 that leaves at most --max-elements elements")
    p.add_argument("--max-elements", type=int, default=1 << 19)
    p.add_argument("--ops", default=",".join(OPS), help="of: " + ", ".join(OPS))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--json", help="also write the counts as a JSON document here")
    p.add_argument("--commit-results", action="store_true",
                   help="the GPU benchmark's cases (--shapes gpu --scale auto --max-elements "
                        "2^18, the ops of its modes fwd, infer, bwd, every dtype and layout) "
                        "into benchmarks/results/traffic.json, which the benchmark's report "
                        "shows beside time and eta")
    args = p.parse_args(argv)
    if args.commit_results:
        args.shapes, args.scale, args.json = "gpu", "auto", RESULTS_DOC
        args.ops, args.dtypes = "fwd,infer,bwd", "float32,float16,bfloat16"
        args.max_elements = min(args.max_elements, 1 << 18)
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error("--ops: unknown %s (of: %s)" % (", ".join(unknown), ", ".join(OPS)))

    import fusedbn  # noqa: F401  (the CPU ops make the backward's inputs)
    from emu_testing import counted_op, emu_config

    from .environment import git_info

    shapes = []
    for name in cases.expand_shape_sets(args.shapes.split(",")):
        shapes += [s for s in cases.SHAPE_SETS[name] if s not in shapes]
    print("fusedbn CUDA traffic, counted by the emulator: shapes / scale (N * spatial) on "
          "132 / scale SMs (scale %s)" % args.scale)
    records = []
    for shape in shapes:
        scale = (auto_scale(shape, args.max_elements) if args.scale == "auto"
                 else int(args.scale))
        for dname in args.dtypes.split(","):
            for fmt in args.layouts.split(","):
                if cases.layout_label(len(shape), fmt) is None:
                    continue
                recs = count_case(shape, dname, fmt, ops, scale, counted_op, emu_config)
                r0 = recs[0]
                print("\n%s (from %s, %d SMs) %s %s, |x| = %d B" % (
                    "x".join(map(str, r0["scaled"])), "x".join(map(str, shape)), r0["sms"],
                    dname, fmt, r0["x_bytes"]))
                for r in recs:
                    print("  %-10s %-44s %5.2f |x| over the bulk tensors (floor %d), %5.2f in all: "
                          "%s" % (r["op"], r["what"], r["bulk_x"], r["floor"], r["total_x"],
                                  " -> ".join(r["kernels"])))
                    print("\n".join(r["tensors"]))
                records += recs
    if args.json:
        from .report import write_json
        doc = {"schema": 1, "env": {"git": git_info(), "torch_version": torch.__version__},
               "config": {"command": "python -m benchmarks.traffic " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
                   "shapes": args.shapes, "scale": args.scale,
                   "max_elements": args.max_elements},
               "records": records}
        write_json(doc, args.json)
        print("\nwrote %s (%d records)" % (args.json, len(records)))


if __name__ == "__main__":
    main()
