"""Fused batch norm + (add +) ReLU against torch: python -m benchmarks.act [--device cpu|cuda]

Providers, on the same inputs and module state:
  fused    fusedbn.FusedBatchNormAct2d(C)(x[, residual])
  eager    nn.BatchNorm2d -> (out += residual) -> nn.ReLU(inplace=True), torchvision's code
  compile  torch.compile of the eager module (inductor, default mode)
Modes: fwd (training-mode forward, autograd recording as in training) and fwd+bwd. Patterns:
BN+ReLU and BN+add+ReLU; dtypes x layouts x shapes below. Then an end-to-end training step
(forward, cross-entropy, backward, SGD step) of a ResNet-50-shaped model, converted with
convert_batchnorm(fuse_activations=True) vs the original, and the saved-activation bytes of
ResNet blocks and models (tests/act_models.py has the models and the byte counter).

Timing: one call at a time with the cache flushed before each (a 64 MB buffer rewritten on the
CPU, 256 MB on a GPU, timed with CUDA events there), warm-up calls first, providers interleaved
round by round in a rotating order (a drift in machine load hits all of them alike), median of
the rounds; on a shared CPU a round during which other processes ran is discarded and repeated. torch uses 2 threads on the CPU (--threads). Results go to
benchmarks/out/act_<device>.json (git-ignored) with the machine, torch and the commit measured;
--commit-results writes benchmarks/results/act_<device>.json, the committed file, instead.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from act_models import (BasicBlock, LeakyBasicBlock, resnet,  # noqa: E402
                        saved_activation_bytes)

SHAPES = {"cpu": [(32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7)],
          "cuda": [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 2048, 7, 7)]}
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16, torch.float32]}
LAYOUTS = ["channels_last", "contiguous"]
PATTERNS = ["bn_relu", "bn_add_relu"]


class EagerBNAct(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, residual=None):
        out = self.bn(x)
        if residual is not None:
            out += residual
        return self.relu(out)


class FusedBNAct(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.bn = fusedbn.FusedBatchNormAct2d(C)

    def forward(self, x, residual=None):
        return self.bn(x, residual)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.buf = torch.zeros((256 if self.cuda else 64) << 20, dtype=torch.uint8, device=device)
        if self.cuda:
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample(self, fn, setup=None):
        """Seconds of one fn() call after setup() and a cache flush (both untimed)."""
        if setup is not None:
            setup()
        self.buf.add_(1)
        if self.cuda:
            self.events[0].record()
            fn()
            self.events[1].record()
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def _jiffies():
    """(CPU time of the whole machine, of this process) in clock ticks (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read()
        own = s[s.rindex(")") + 2:].split()
        return sum(v) - v[3] - v[4], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


CONTENDED = {"discarded_rounds": 0, "kept_contended_rounds": 0}


def interleaved_medians(timer, calls, rounds, warmup=3, retries=30):
    """calls: name -> (fn, setup). Median seconds per name over `rounds` rotated rounds. The CPU
    here is shared with other jobs: a round during which other processes used more than one
    clock tick of CPU time is discarded and run again (after a short pause), up to `retries`
    times; CONTENDED counts both."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            fn, setup = calls[name]
            timer.sample(fn, setup)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for attempt in range(retries + 1):
            before = _jiffies()
            got = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, setup = calls[name]
                got[name] = timer.sample(fn, setup)
            after = _jiffies()
            others = (after[0] - before[0]) - (after[1] - before[1]) if before and after else 0
            if timer.cuda or others <= 1:
                break
            if attempt == retries:
                CONTENDED["kept_contended_rounds"] += 1
                break
            CONTENDED["discarded_rounds"] += 1
            time.sleep(0.2)
        for name, t in got.items():
            samples[name].append(t)
    return {n: statistics.median(s) for n, s in samples.items()}


def layer_case(device, shape, dtype, layout, pattern, mode, rounds, providers):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
    r = (torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
         if pattern == "bn_add_relu" else None)
    dy = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
    eager = EagerBNAct(shape[1]).to(device=device, dtype=dtype)
    mods = {"eager": eager, "fused": FusedBNAct(shape[1]).to(device=device, dtype=dtype)}
    mods["fused"].bn.load_state_dict(eager.bn.state_dict())
    if "compile" in providers:
        mods["compile"] = torch.compile(copy.deepcopy(eager))
    with torch.no_grad():  # the same numbers (a guard against timing a broken kernel)
        ref, got = eager(x.detach(), r), mods["fused"](x.detach(), r)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)

    def call(m):
        def fn():
            y = m(x, r)
            if mode == "fwd+bwd":
                y.backward(dy)
        return fn, None

    return interleaved_medians(Timer(device), {p: call(mods[p]) for p in providers}, rounds)


def train_step_case(device, rounds, args):
    """One SGD step of a ResNet-50-shaped model: original vs converted (fused BN + ReLU)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    N, hw, width = (64, 224, 64) if cuda else (args.e2e_batch, args.e2e_size, args.e2e_width)
    torch.manual_seed(0)
    model = resnet(50, width, num_classes=100).to(device=device, dtype=dtype,
                                                 memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fusedbn.convert_batchnorm(copy.deepcopy(model), fuse_activations=True)
    x = torch.randn(N, 3, hw, hw, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (N,), device=device)
    calls = {}
    for name, m in (("original", model), ("converted", converted)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()
            opt.step()
        calls[name] = (step, None)
    t = interleaved_medians(Timer(device), calls, rounds, warmup=2)
    return {"model": f"resnet50-shaped width {width}", "batch": N, "image": hw,
            "dtype": str(dtype).replace("torch.", ""), "memory_format": "channels_last",
            "ms": {k: 1e3 * v for k, v in t.items()},
            "speedup": t["original"] / t["converted"]}


def memory_report(device):
    """Saved-activation bytes: eager (BN + ReLU) vs fused, normal and memory-saving."""
    def conv(m, ms):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fusedbn.convert_batchnorm(copy.deepcopy(m), fuse_activations=True,
                                             memory_saving=ms).to(device)

    def leaky(model):
        for mod in model.modules():
            for n, ch in mod.named_children():
                if isinstance(ch, nn.ReLU):
                    setattr(mod, n, nn.LeakyReLU(0.01, inplace=True))
        return model

    cases = {
        "basic_block": (lambda: BasicBlock(64, 64), lambda: LeakyBasicBlock(64, 64),
                        (8, 64, 56, 56)),
        "stage_of_2_blocks": (lambda: nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64)),
                              lambda: nn.Sequential(LeakyBasicBlock(64, 64),
                                                    LeakyBasicBlock(64, 64)), (8, 64, 56, 56)),
        "resnet18": (lambda: resnet(18), lambda: leaky(resnet(18)), (8, 3, 224, 224)),
        "resnet50": (lambda: resnet(50), lambda: leaky(resnet(50)), (8, 3, 224, 224)),
    }
    out = {}
    for name, (relu_model, leaky_model, shape) in cases.items():
        torch.manual_seed(0)
        x = torch.randn(shape, device=device, requires_grad=shape[1] != 3)
        eager = relu_model().to(device)
        row = {"eager_bn_relu": saved_activation_bytes(eager, x)[0],
               "fused_relu": saved_activation_bytes(conv(eager, False), x)[0],
               "fused_relu_memory_saving": saved_activation_bytes(conv(eager, True), x)[0],
               "fused_leaky_relu_memory_saving":
                   saved_activation_bytes(conv(leaky_model(), True), x)[0]}
        row["reduction_vs_eager"] = {k: 1 - v / row["eager_bn_relu"] for k, v in row.items()
                                     if k != "eager_bn_relu"}
        out[name] = row
    return out


def environment(device):
    def run(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "fusedbn": fusedbn.build_info(),
            "python": platform.python_version(),
            "commit": run(["git", "rev-parse", "HEAD"]),
            "dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"])),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="one shape, one dtype, no compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--e2e-batch", type=int, default=16)
    p.add_argument("--e2e-size", type=int, default=96)
    p.add_argument("--e2e-width", type=int, default=32)
    p.add_argument("--out", default=None, help="results JSON (default "
                   "benchmarks/out/act_<device>.json; benchmarks/out/ is git-ignored)")
    p.add_argument("--commit-results", action="store_true", help="write "
                   "benchmarks/results/act_<device>.json, the committed results, instead")
    args = p.parse_args()
    if args.commit_results and (args.out or args.quick):
        p.error("--commit-results writes the full run to benchmarks/results/: it takes neither "
                "--out nor --quick")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    kind = device.type
    shapes, dtypes = SHAPES[kind], DTYPES[kind]
    if args.quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    results = {"environment": environment(device), "layers": []}
    print("# fused BN + (add +) ReLU vs eager / torch.compile, medians in ms (%s)"
          % results["environment"]["device"])
    print("%-12s %-18s %-9s %-14s %-8s %9s %9s %9s %8s %8s" % (
        "pattern", "shape", "dtype", "layout", "mode", "fused", "eager", "compile",
        "x eager", "x comp"))
    for shape in shapes:
        for dtype in dtypes:
            for layout in LAYOUTS:
                for pattern in PATTERNS:
                    for mode in ("fwd", "fwd+bwd"):
                        providers = ["fused", "eager"]
                        if not (args.quick or args.no_compile) and shape == shapes[0]:
                            providers.append("compile")
                        t = layer_case(device, shape, dtype, layout, pattern, mode, args.rounds,
                                       providers)
                        row = {"pattern": pattern, "shape": list(shape),
                               "dtype": str(dtype).replace("torch.", ""), "layout": layout,
                               "mode": mode, "ms": {k: 1e3 * v for k, v in t.items()},
                               "speedup_vs_eager": t["eager"] / t["fused"]}
                        if "compile" in t:
                            row["speedup_vs_compile"] = t["compile"] / t["fused"]
                        results["layers"].append(row)
                        print("%-12s %-18s %-9s %-14s %-8s %9.3f %9.3f %9s %8.2f %8s" % (
                            pattern, "x".join(map(str, shape)), row["dtype"], layout, mode,
                            row["ms"]["fused"], row["ms"]["eager"],
                            "%.3f" % row["ms"]["compile"] if "compile" in t else "-",
                            row["speedup_vs_eager"],
                            "%.2f" % row["speedup_vs_compile"] if "compile" in t else "-"),
                            flush=True)
    results["train_step"] = train_step_case(device, max(5, args.rounds // 2), args)
    e2e = results["train_step"]
    print("# training step, %s, N=%d, %dx%d, %s: original %.1f ms, converted %.1f ms, x%.3f" % (
        e2e["model"], e2e["batch"], e2e["image"], e2e["image"], e2e["dtype"],
        e2e["ms"]["original"], e2e["ms"]["converted"], e2e["speedup"]))
    results["saved_activation_bytes"] = memory_report(device)
    print("# saved-activation bytes, reduction vs nn.BatchNorm2d + nn.ReLU eager:")
    for name, row in results["saved_activation_bytes"].items():
        print("  %-18s eager %7.1f MB  " % (name, row["eager_bn_relu"] / 1e6) + "  ".join(
            "%s %+.1f%%" % (k, -100 * v) for k, v in row["reduction_vs_eager"].items()))
    results["environment"]["load_average_after"] = (os.getloadavg() if hasattr(os, "getloadavg")
                                                    else None)
    results["environment"]["rounds_with_other_processes"] = dict(CONTENDED)
    folder = "results" if args.commit_results else "out"
    out = args.out or os.path.join(ROOT, "benchmarks", folder, "act_%s.json" % kind)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print("# written to", os.path.relpath(out, ROOT))


if __name__ == "__main__":
    main()
