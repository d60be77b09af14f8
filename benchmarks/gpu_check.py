"""Verify and measure fusedbn on a GPU in one command, within a time budget:

    bash scripts/gpu_check.sh                      # everything that fits in 510 s, into $OUT
    bash scripts/gpu_check.sh --resume --budget 240   # later, on the warm machine: the rest
    bash scripts/gpu_check.sh --only bench --out DIR  # one stage (the build is reused)
    bash scripts/gpu_check.sh --dry-run --out DIR     # no GPU: the same stages on the CPU (CI)

Stages, in this order (benchmarks/gpu_stages.py says what each does): build, quick, tests,
sanitizers, bench. The order is by worth per second: nothing runs without the build; the quick
stage exercises every CUDA kernel path once in about a minute (and gives determinism, graph
capture and the > 2^31 case), so that a crash shows before the long stages; the full suite is the
parity evidence; the sanitizers come next; the benchmark takes whatever time is left, in chunks,
the most wanted first, and continues on --resume. A stage whose estimate exceeds the time left is
skipped, and the summary says so with the numbers.

Everything goes to one directory (--out, default $OUT), at most 8 files, the limit of what the
device machine returns: summary.json, summary.md, log.txt, junit.xml, sanitizer.txt, bench.json,
bench.png. `python -m benchmarks.ingest DIR` turns it into committed results and README sections.
State for --resume/--from lives in --work (default build/gpu_check/, ignored by git).
"""
import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from . import gpu_runner, gpu_stages
from .gpu_stages import ORDER, ROOT, STAGES

DEFAULT_BUDGET = 510      # 8.5 minutes: one 10-minute command with margin
DRY_RUN_BUDGET = 300
MARGIN = 15               # seconds kept for writing the summary at the end
STATE_VERSION = 1
OUT_FILES = ("summary.json", "summary.md", "log.txt", "junit.xml", "sanitizer.txt",
             "bench.json", "bench.png")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="output directory (default: $OUT)")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "gpu_check"),
                   help="state and intermediate files (default: build/gpu_check)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default %d; %d "
                   "with --dry-run)" % (DEFAULT_BUDGET, DRY_RUN_BUDGET))
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--only", help="comma list of stages to run (%s)" % ",".join(ORDER))
    sel.add_argument("--from", dest="from_stage", choices=ORDER,
                     help="run this stage and the ones after it")
    sel.add_argument("--resume", action="store_true", help="run the stages (and benchmark "
                     "chunks) that did not finish in the last run on this tree")
    p.add_argument("--skip", help="comma list of stages not to run")
    p.add_argument("--dry-run", action="store_true", help="CPU only, never builds: a tiny test "
                   "subset, a 2-case benchmark, no sanitizers (what CI runs)")
    p.add_argument("--jobs", type=int, help="pytest-xdist workers for the tests stage "
                   "(default: cores/2, at most 8, when pytest-xdist is installed; 0: serial)")
    p.add_argument("--max-jobs", type=int, help="MAX_JOBS of the build (default: the cores)")
    p.add_argument("--no-large", action="store_true", help="leave out the > 2^30 and > 2^31 "
                   "element cases")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out DIR is needed where $OUT is not set")
    for opt in ("only", "skip"):
        bad = [s for s in (getattr(args, opt) or "").split(",") if s and s not in STAGES]
        if bad:
            p.error("--%s: unknown stage(s) %s (stages: %s)" % (opt, bad, ",".join(ORDER)))
    if args.budget is None:
        args.budget = DRY_RUN_BUDGET if args.dry_run else DEFAULT_BUDGET
    return args


class Context:
    """What every stage sees."""

    def __init__(self, args, log, state, environment, env):
        self.args, self.log, self.state, self.environment, self.env = (args, log, state,
                                                                        environment, env)
        self.dry_run = args.dry_run
        self.python = sys.executable
        self.work = os.path.abspath(args.work)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget

    def time_left(self):
        return max(0.0, self.deadline - time.monotonic() - MARGIN)

    def elapsed(self):
        return time.monotonic() - self.start


# ---- environment, tree, state -----------------------------------------------------------------
ENV_PROBE = r"""
import json, os, platform, torch
d = {"python": platform.python_version(), "platform": platform.platform(),
     "torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda,
     "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu_name=p.name, cuda_capability="%d.%d" % (p.major, p.minor),
             sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
             cudnn_version=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
print("ENV " + json.dumps(d))
"""


def _cmd_output(cmd, cwd=ROOT):
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def tree_hash():
    """sha1 of the sources, tests and scripts (what the results belong to, with or without git)."""
    h = hashlib.sha1()
    for top in ("csrc", "fusedbn", "tests", "benchmarks", "scripts"):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "results"))
            for name in sorted(files):
                if name.endswith((".py", ".cu", ".cuh", ".h", ".cpp", ".sh")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, ROOT).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def collect_environment(log, env):
    res = gpu_runner.run([sys.executable, "-c", ENV_PROBE], log, env=env, cwd=ROOT, timeout=120,
                         echo=False)
    info = {}
    for line in res["output"].splitlines():
        if line.startswith("ENV "):
            info = json.loads(line[4:])
    if not info:
        info["probe_error"] = res["output"][-1000:]
    info["driver_version"] = _cmd_output(["nvidia-smi", "--query-gpu=driver_version",
                                          "--format=csv,noheader"])
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    out = _cmd_output([nvcc if os.path.exists(nvcc) else "nvcc", "--version"])
    info["nvcc"] = out.splitlines()[-1] if out else None
    sanitizer = gpu_stages.find_sanitizer()
    out = _cmd_output([sanitizer, "--version"]) if sanitizer else None
    info["compute_sanitizer"] = out.splitlines()[-1] if out else None
    commit = _cmd_output(["git", "rev-parse", "HEAD"]) or os.environ.get("GPU_CHECK_COMMIT")
    status = _cmd_output(["git", "status", "--porcelain", "--untracked-files=no"])
    info["git"] = {"commit": commit, "dirty": None if status is None else bool(status),
                   "source": "git" if status is not None else "GPU_CHECK_COMMIT"}
    info["tree_hash"] = tree_hash()
    info["hostname"] = os.uname().nodename
    return info


def load_state(path, environment, log):
    """The saved state when it belongs to this tree; otherwise a fresh one (times and the build
    stamp carry over: they describe the machine and the build, not the results)."""
    fresh = {"version": STATE_VERSION, "tree_hash": environment["tree_hash"], "stages": {},
             "times": {}, "bench_chunks": {}}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return fresh
    if old.get("version") != STATE_VERSION:
        return fresh
    if old.get("tree_hash") != environment["tree_hash"]:
        log.line("state: %s is of another tree; earlier stage results are not used" % path)
        fresh["times"] = old.get("times", {})
        fresh["build_stamp"] = old.get("build_stamp")
        return fresh
    old.setdefault("times", {})
    old.setdefault("bench_chunks", {})
    old.setdefault("stages", {})
    return old


def save_state(ctx):
    path = os.path.join(ctx.work, "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(ctx.state, f, indent=1)
    os.replace(path + ".tmp", path)


def selected_stages(args, state):
    if args.only:
        names = args.only.split(",")
    elif args.from_stage:
        names = ORDER[ORDER.index(args.from_stage):]
    elif args.resume:
        names = [s for s in ORDER if state["stages"].get(s, {}).get("status")
                 not in ("passed", "failed")]
    else:
        names = list(ORDER)
    skip = set((args.skip or "").split(","))
    return [s for s in ORDER if s in names and s not in skip]


# ---- summary ----------------------------------------------------------------------------------
def stage_note(name, r):
    """One line about a stage result for the summary table."""
    if r is None:
        return "not run"
    note = [r.get("reason")] if r.get("reason") else []
    if name == "build" and r.get("build_info"):
        bi = r["build_info"]
        note.insert(0, "%s; backends %s %s" % (r.get("action"), ",".join(bi.get("backends", [])),
                                              bi.get("cuda_arch_list", "")))
    if r.get("pytest"):
        note.insert(0, r["pytest"])
    counts = r.get("counts")
    if counts:
        c = counts["cuda"]
        note.append("on CUDA: %d passed, %d failed, %d skipped" % (c["passed"], c["failed"],
                                                                  c["skipped"]))
    if name == "sanitizers" and r.get("tools"):
        note.insert(0, "; ".join("%s %s%s" % (k, v["status"], ": " + v["summary_line"]
                                              if v.get("summary_line") else "")
                                 for k, v in r["tools"].items()))
    if name == "bench" and r.get("chunks"):
        ok = [k for k, v in r["chunks"].items() if v["status"] == "passed"]
        note.insert(0, "%d of %d chunks (%d cases)" % (len(ok), len(r["chunks"]),
                                                       r.get("cases", 0)))
    if r.get("from_earlier_run"):
        note.append("from the run of %s" % r["from_earlier_run"])
    return "; ".join(n for n in note if n)


def cuda_dtypes(stages):
    """Per input dtype, CUDA tests passed and failed over the quick and tests stages."""
    out = {}
    for name in ("quick", "tests"):
        counts = (stages.get(name) or {}).get("counts") or {}
        for dt, c in counts.get("cuda_dtypes", {}).items():
            d = out.setdefault(dt, {"passed": 0, "failed": 0})
            d["passed"] += c["passed"]
            d["failed"] += c["failed"]
    return out


def summary_markdown(summary):
    e = summary["environment"]
    git = e.get("git") or {}
    lines = ["# fusedbn GPU check%s: %s" % (" (dry run)" if summary["dry_run"] else "",
                                            e.get("gpu_name") or "no GPU"), "",
             "- commit %s%s, tree %s, %s" % ((git.get("commit") or "unknown")[:12],
                                             " (dirty)" if git.get("dirty") else "",
                                             e.get("tree_hash"), summary["finished"]),
             ("- GPU %s (sm %s, %s SMs, %.0f GiB), driver %s, cuDNN %s" % (
                 e.get("gpu_name"), e.get("cuda_capability"), e.get("sm_count"),
                 (e.get("gpu_memory_bytes") or 0) / 2 ** 30, e.get("driver_version"),
                 e.get("cudnn_version")) if e.get("gpu_name") else "- no GPU (%s)" % (
                     "dry run on the CPU" if summary["dry_run"] else "torch sees none")),
             "- torch %s (CUDA %s), %s, Python %s, %s cores" % (
                 e.get("torch_version"), e.get("torch_cuda_version"), e.get("nvcc"),
                 e.get("python"), e.get("cpu_count")),
             "- command `%s`, budget %.0f s, used %.0f s" % (summary["command"],
                                                             summary["budget_s"],
                                                             summary["elapsed_s"]), "",
             "| stage | status | seconds | notes |", "|---|---|---:|---|"]
    for name in ORDER:
        r = summary["stages"].get(name)
        lines.append("| %s | %s | %s | %s |" % (name, r["status"] if r else "-",
                                                "%.0f" % r["seconds"] if r else "-",
                                                stage_note(name, r).replace("|", "/")))
    dts = summary.get("cuda_dtypes") or {}
    if dts:
        lines += ["", "CUDA tests per input dtype: " + ", ".join(
            "%s %d passed / %d failed" % (k, v["passed"], v["failed"])
            for k, v in sorted(dts.items()))]
    failed = []
    for name in ("quick", "tests"):
        failed += ((summary["stages"].get(name) or {}).get("counts") or {}).get(
            "failed_tests", [])
    if failed:
        lines += ["", "Failed tests (first %d):" % len(failed)] + ["- `%s`" % t for t in failed]
    bench = (summary["stages"].get("bench") or {}).get("files") or {}
    if bench.get("headline"):
        lines += [""] + ["- " + h for h in bench["headline"]]
    if summary.get("next"):
        lines += ["", "Next: " + summary["next"]]
    return "\n".join(lines) + "\n"


def next_step(summary):
    todo = [n for n in ORDER if (summary["stages"].get(n) or {}).get("status") not in
            ("passed", "failed")]
    if not todo or summary["dry_run"]:
        return None
    return ("%s did not finish; on the warm machine run `bash scripts/gpu_check.sh --resume "
            "--budget SECONDS`" % ", ".join(todo))


def write_outputs(ctx, ran, argv):
    stages = {}
    for name in ORDER:
        if name in ctx.state["stages"]:
            r = dict(ctx.state["stages"][name])
            if name not in ran:
                r["from_earlier_run"] = r.get("finished_at")
            stages[name] = r
    summary = {"kind": "fusedbn-gpu-check", "version": 1, "dry_run": ctx.dry_run,
               "command": "bash scripts/gpu_check.sh " + " ".join(argv),
               "finished": datetime.datetime.now(datetime.timezone.utc).strftime(
                   "%Y-%m-%d %H:%M UTC"),
               "budget_s": ctx.args.budget, "elapsed_s": round(ctx.elapsed(), 1),
               "environment": ctx.environment, "stages": stages,
               "cuda_dtypes": cuda_dtypes(stages)}
    summary["next"] = next_step(summary)
    out = ctx.args.out
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = summary_markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    gpu_runner.merge_junit([os.path.join(ctx.work, "junit_%s.xml" % n) for n in ("quick",
                                                                              "tests")],
                           os.path.join(out, "junit.xml"))
    for name in ("sanitizer.txt", "bench.json", "bench.png"):
        src = os.path.join(ctx.work, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
    return summary, text


# ---- main -------------------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    log = gpu_runner.Log(os.path.join(args.out, "log.txt"))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths only, even where a GPU is present
    environment = collect_environment(log, env)
    if not args.dry_run and not environment.get("cuda_available"):
        log.line("gpu_check: torch sees no GPU (%s); use --dry-run for the CPU rehearsal"
                 % environment.get("probe_error", "torch.cuda.is_available() is False"))
        return 2
    state = load_state(os.path.join(args.work, "state.json"), environment, log)
    if not (args.resume or args.only or args.from_stage):
        state["stages"], state["bench_chunks"] = {}, {}
    ctx = Context(args, log, state, environment, env)
    names = selected_stages(args, state)
    if "build" not in names and not gpu_stages.build_is_current(ctx)[0] and names:
        log.line("gpu_check: the build is missing or stale, so the build stage runs first")
        names.insert(0, "build")
    log.line("gpu_check: %s, torch %s; stages %s; budget %.0f s"
             % (environment.get("gpu_name") or "CPU (dry run)", environment.get("torch_version"),
                ",".join(names), args.budget))
    ran = []
    for name in names:
        build_status = state["stages"].get("build", {}).get("status")
        need = gpu_stages.stage_estimate(name, ctx)
        if name != "build" and build_status in ("failed", "timeout"):
            result = {"status": "skipped", "seconds": 0, "reason": "the build %s" % (
                "failed" if build_status == "failed" else "did not finish in time")}
        elif need > ctx.time_left():
            result = {"status": "skipped", "seconds": 0,
                      "reason": "needs ~%.0f s, %.0f s left of the %.0f s budget"
                      % (need, ctx.time_left(), args.budget)}
        else:
            log.line("\n==== %s (estimate %.0f s, %.0f s left)" % (name, need, ctx.time_left()))
            try:
                result = STAGES[name](ctx)
            except Exception as e:  # a broken stage must not cost the others' results
                import traceback
                log.line(traceback.format_exc())
                result = {"status": "failed", "seconds": 0,
                          "reason": "%s: %s" % (type(e).__name__, e)}
        result["finished_at"] = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC")
        log.line("==== %s: %s (%.0f s)%s" % (name, result["status"], result.get("seconds", 0),
                                            " - " + result["reason"] if result.get("reason")
                                            else ""))
        state["stages"][name] = result
        ran.append(name)
        save_state(ctx)
        write_outputs(ctx, ran, argv)
    summary, text = write_outputs(ctx, ran, argv)
    extra = sorted(set(os.listdir(args.out)) - set(OUT_FILES))
    if extra:
        log.line("gpu_check: warning: %s in %s besides the expected files (the device machine "
                 "returns at most 8)" % (extra, args.out))
    log.line("\n" + text)
    bad = [n for n in ran if state["stages"][n]["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
