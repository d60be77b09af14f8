"""The stages of scripts/gpu_check.sh (benchmarks/gpu_check.py), in the order they run:

  build       compile fusedbn in place for the GPU that is there (TORCH_CUDA_ARCH_LIST from its
              compute capability, MAX_JOBS from the cores, FORCE_CUDA=1 so that a build without
              CUDA kernels fails instead of passing quietly); reused when the extensions are newer
              than every source and were built for this GPU and torch. The dry run never builds.
  quick       tests/gpu: one small call of every CUDA kernel path against the CPU path, the
              64-bit index cases, determinism, CUDA-graph capture, the > 2^31-element case
  tests       the whole suite, every device-parametrized test on CPU and CUDA
  sanitizers  compute-sanitizer memcheck, racecheck, initcheck on tests/gpu/sanitizer_cases.py
              (and memcheck on its > 2^30-element cases when time is left)
  bench       python -m benchmarks in chunks (shape set x dtype), the most wanted first, as many
              as the time left allows; merged into one results document with its PNG

Each stage function takes the Context and returns its result dict: status (passed, failed,
skipped, timeout), seconds, reason, and what it measured.
"""
import glob
import hashlib
import json
import os
import shutil
import sys

from . import gpu_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds each stage is expected to take (GPU run, dry run); refined from earlier runs.
ESTIMATES = {
    "build": (330, 10), "build_reused": (15, 10), "quick": (90, 20), "tests": (240, 40),
    "tests_parallel": (120, 40), "sanitizer_tool": (75, 0), "sanitizer_large": (90, 0),
    "bench_case": (2.0, 2.0), "bench_chunk_overhead": (20, 10),
}

# The benchmark chunks, most wanted first: every (shape set, dtype) of the table
# (ResNet-50, EfficientNet, UNet; bf16, fp32, fp16; NCHW and channels_last; fwd, bwd, fwdbwd),
# then eval mode and the extra shape sets.
GPU_BENCH_TRAIN = [(s, d) for d in ("bfloat16", "float32", "float16")
                   for s in ("unet", "efficientnet", "resnet50")]
GPU_BENCH_EXTRA = [("smallc,bn1d", "bfloat16,float32,float16", "fwd,bwd,fwdbwd"),
                   ("unet,efficientnet,resnet50", "bfloat16", "infer")]


def estimate(name, ctx):
    """Expected seconds of a stage part: its time in an earlier run on this machine, else the
    default above."""
    seen = ctx.state.get("times", {}).get(name)
    gpu, dry = ESTIMATES[name]
    return seen if seen is not None else (dry if ctx.dry_run else gpu)


def _pytest_cmd(ctx, targets, junit, extra=()):
    cmd = [ctx.python, "-m", "pytest", *targets, "-q", "-rfEs", "-p", "no:cacheprovider",
           "--junitxml", junit, *extra]
    return cmd


def _result(status, seconds=0.0, reason=None, **kw):
    out = {"status": status, "seconds": round(seconds, 1)}
    if reason:
        out["reason"] = reason
    out.update(kw)
    return out


# ---- build ------------------------------------------------------------------------------------
def build_config(ctx):
    """The environment of the build: what setup.py is told."""
    env = {}
    if not ctx.dry_run:
        cap = ctx.environment.get("cuda_capability")
        env["TORCH_CUDA_ARCH_LIST"] = cap or ""
        env["FORCE_CUDA"] = "1"
        cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir(
            "/usr/local/cuda") else None)
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
    env["MAX_JOBS"] = str(ctx.args.max_jobs or os.cpu_count() or 2)
    return env


def build_sources():
    return [p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
            if os.path.isfile(p)] + [os.path.join(ROOT, "setup.py")]


def built_extensions():
    return sorted(glob.glob(os.path.join(ROOT, "fusedbn", "_C*.so"))
                  + glob.glob(os.path.join(ROOT, "fusedbn", "_cpu_*.so")))


def sources_hash():
    """sha1 of the build's sources: the device machine may copy the tree afresh for each
    command, with new modification times, so times alone would rebuild every time."""
    h = hashlib.sha1()
    for path in sorted(build_sources()):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build_is_current(ctx):
    """(current, why not). GPU run: the extensions exist and this script built them from the
    same sources for this compute capability and torch. Dry run (a build made by CI or by
    hand): the extensions exist and are newer than every source."""
    built = built_extensions()
    if not any(os.path.basename(p).startswith("_C") for p in built):
        return False, "no fusedbn/_C*.so"
    if ctx.dry_run:
        newest = max(os.path.getmtime(p) for p in build_sources())
        if newest > min(os.path.getmtime(p) for p in built):
            return False, "a source is newer than the built extensions"
        return True, None
    stamp = ctx.state.get("build_stamp") or {}
    want = build_stamp(ctx)
    if stamp != want:
        return False, "built for %s, need %s" % (stamp or "another configuration", want)
    return True, None


def build_stamp(ctx):
    return {"arch": ctx.environment.get("cuda_capability"),
            "torch": ctx.environment.get("torch_version"), "sources": sources_hash()}


def probe_build(ctx):
    """fusedbn.build_info() in a fresh interpreter, or the error."""
    code = "import json, fusedbn; print('BUILD_INFO ' + json.dumps(fusedbn.build_info()))"
    res = gpu_runner.run([ctx.python, "-c", code], ctx.log, env=ctx.env, cwd=ROOT, timeout=120,
                         echo=False)
    for line in res["output"].splitlines():
        if line.startswith("BUILD_INFO "):
            return json.loads(line[len("BUILD_INFO "):]), None
    return None, res["output"][-2000:]


def stage_build(ctx):
    cfg = build_config(ctx)
    cmd = [ctx.python, "setup.py", "build_ext", "--inplace"]
    current, why = build_is_current(ctx)
    seconds = 0.0
    if current:
        ctx.log.line("build: reusing the extensions in fusedbn/ (newer than every source)")
        action = "reused"
    elif ctx.dry_run:
        return _result("skipped", reason="dry run: never builds (%s); would run %s with %s"
                       % (why, " ".join(cmd), cfg))
    else:
        ctx.log.line("build: %s; building with %s" % (why, cfg))
        res = gpu_runner.run(cmd, ctx.log, env=dict(ctx.env, **cfg), cwd=ROOT,
                             timeout=ctx.time_left())
        seconds = res["seconds"]
        if res["timed_out"]:
            return _result("timeout", seconds, "the build ran out of time", env=cfg)
        if res["rc"] != 0:
            return _result("failed", seconds, "setup.py build_ext exited with %d" % res["rc"],
                           env=cfg, output_tail=res["output"][-3000:])
        action = "built"
        ctx.state["times"]["build"] = seconds
    info, err = probe_build(ctx)
    if info is None:
        return _result("failed", seconds, "import fusedbn failed", action=action,
                       output_tail=err)
    if not ctx.dry_run:
        arch = "sm_" + (ctx.environment.get("cuda_capability") or "").replace(".", "")
        if "cuda" not in info.get("backends", ()) or arch not in info.get("cuda_arch_list", ""):
            return _result("failed", seconds, "built without CUDA kernels for %s: %s"
                           % (arch, info), action=action, build_info=info)
        ctx.state["build_stamp"] = build_stamp(ctx)
    return _result("passed", seconds, action=action, build_info=info, env=cfg,
                   command=" ".join(cmd))


# ---- pytest stages ----------------------------------------------------------------------------
def _pytest_stage(ctx, name, targets, extra=(), env=None):
    junit = os.path.join(ctx.work, "junit_%s.xml" % name)
    if os.path.exists(junit):
        os.remove(junit)
    cmd = _pytest_cmd(ctx, targets, junit, extra)
    res = gpu_runner.run(cmd, ctx.log, env=env or ctx.env, cwd=ROOT, timeout=ctx.time_left())
    counts = gpu_runner.read_junit(junit) if os.path.exists(junit) else None
    summary = gpu_runner.pytest_tail(res["output"])
    if res["timed_out"]:
        status = "timeout"
    elif res["rc"] == 0 and counts and counts["totals"]["passed"] > 0:
        status = "passed"
    else:
        status = "failed"
    reason = None if status == "passed" else "pytest exited with %s%s" % (
        res["rc"], " (out of time)" if res["timed_out"] else "")
    if status == "passed":
        ctx.state["times"][name if name != "tests" or "-n" not in extra
                           else "tests_parallel"] = res["seconds"]
    return _result(status, res["seconds"], reason, pytest=summary, counts=counts,
                   junit=os.path.basename(junit),
                   command=" ".join(cmd).replace(ctx.python, "python").replace(ctx.work + "/", ""))


def stage_quick(ctx):
    targets = ["tests/gpu"]
    extra = ["-k", "not more_than_2_31 and not large"] if ctx.args.no_large else []
    return _pytest_stage(ctx, "quick", targets, extra)


DRY_RUN_TESTS = ["tests/test_build.py::test_build_info", "tests/test_parity.py",
                 "-k", "test_build_info or (test_module_parity_train and 16x5-contiguous and "
                 "f32-params_f32)"]


def xdist_workers(ctx):
    if ctx.args.jobs is not None:
        return ctx.args.jobs
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def stage_tests(ctx):
    if ctx.dry_run:
        return _pytest_stage(ctx, "tests", DRY_RUN_TESTS)
    # tests/gpu ran in the quick stage; this script's own CPU dry run has no business here.
    extra = ["--ignore", "tests/test_gpu_check.py"]
    if ctx.state["stages"].get("quick", {}).get("status") == "passed":
        extra += ["--ignore", "tests/gpu"]
    workers = xdist_workers(ctx)
    env = ctx.env
    if workers > 1:
        extra += ["-n", str(workers), "--dist", "load"]
        # the CPU tests' torch threads share the cores instead of oversubscribing them
        env = dict(ctx.env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
    res = _pytest_stage(ctx, "tests", ["tests"], extra, env)
    res["xdist_workers"] = workers
    res["ignored"] = [extra[i + 1] for i, a in enumerate(extra) if a == "--ignore"]
    return res


def tests_estimate(ctx):
    return estimate("tests_parallel" if xdist_workers(ctx) > 1 and not ctx.dry_run
                    else "tests", ctx)


# ---- sanitizers -------------------------------------------------------------------------------
def find_sanitizer():
    for p in (shutil.which("compute-sanitizer"),
              os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin",
                           "compute-sanitizer")):
        if p and os.path.exists(p):
            return p
    return None


SANITIZER_RUNS = [
    # (name, tool, extra tool options, sanitizer_cases.py options)
    ("memcheck", "memcheck", ["--kernel-name", "kns=fusedbn"], []),
    ("racecheck", "racecheck", ["--kernel-name", "kns=fusedbn", "--racecheck-report", "all"], []),
    # initcheck checks every kernel: one filtered out would not mark what it writes as written.
    ("initcheck", "initcheck", [], []),
    ("memcheck_large", "memcheck", ["--kernel-name", "kns=fusedbn"],
     ["--only", "large_planes_bf16,large_rows_bf16,large_act_relu_bf16", "--large"]),
]


def sanitizer_command(tool_path, tool, opts, case_opts, python):
    return ([tool_path, "--tool", tool, "--error-exitcode", "99", "--print-limit", "100"]
            + opts + [python, "tests/gpu/sanitizer_cases.py", "--device", "cuda"] + case_opts)


def stage_sanitizers(ctx):
    tool_path = find_sanitizer()
    runs = [r for r in SANITIZER_RUNS if r[0] != "memcheck_large" or not ctx.args.no_large]
    planned = {name: " ".join(sanitizer_command(tool_path or "compute-sanitizer", t, o, c,
                                                "python")) for name, t, o, c in runs}
    if ctx.dry_run:
        return _result("skipped", reason="dry run: no GPU, so no compute-sanitizer",
                       planned=planned)
    if tool_path is None:
        return _result("skipped", reason="compute-sanitizer not found (PATH, $CUDA_HOME/bin)",
                       planned=planned)
    env = dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every tensor its own allocation
    results, total = {}, 0.0
    previous = (ctx.state["stages"].get("sanitizers") or {}).get("tools") or {}
    for name, tool, opts, case_opts in runs:
        excerpt_path = os.path.join(ctx.work, "sanitizer_%s.txt" % name)
        if previous.get(name, {}).get("status") == "passed" and os.path.exists(excerpt_path):
            results[name] = dict(previous[name], reused=True)  # --resume: clean already
            continue
        if os.path.exists(excerpt_path):
            os.remove(excerpt_path)  # of an earlier run
        est = estimate("sanitizer_large" if name == "memcheck_large" else "sanitizer_tool", ctx)
        if est > ctx.time_left():
            results[name] = _result("skipped", reason="needs ~%.0f s, %.0f s left"
                                    % (est, ctx.time_left()))
            continue
        cmd = sanitizer_command(tool_path, tool, opts, case_opts, ctx.python)
        res = gpu_runner.run(cmd, ctx.log, env=env, cwd=ROOT, timeout=ctx.time_left())
        summ = gpu_runner.sanitizer_summary(res["output"])
        if not summ["program_finished"] and not res["timed_out"] and opts and \
                "kernel-name" in " ".join(opts) and summ["errors"] is None:
            # An older tool without --kernel-name: check every kernel instead.
            ctx.log.line("sanitizer: %s did not run the cases; again without --kernel-name"
                         % name)
            cmd = sanitizer_command(tool_path, tool, [o for o in opts if o not in (
                "--kernel-name", "kns=fusedbn")], case_opts, ctx.python)
            res = gpu_runner.run(cmd, ctx.log, env=env, cwd=ROOT, timeout=ctx.time_left())
            summ = gpu_runner.sanitizer_summary(res["output"])
        total += res["seconds"]
        ctx.state["times"]["sanitizer_large" if name == "memcheck_large"
                           else "sanitizer_tool"] = res["seconds"]
        clean = (summ["program_finished"] and summ["cases_failed"] == 0
                 and summ["reports_in_fusedbn"] == 0 and (summ["errors"] == 0 or (
                     summ["errors"] and summ["reports_elsewhere"] >= summ["errors"])))
        status = "timeout" if res["timed_out"] else ("passed" if clean else "failed")
        results[name] = _result(status, res["seconds"], None if clean else (
            "rc %s; %s" % (res["rc"], summ["summary_line"] or "no summary")), rc=res["rc"],
            command=" ".join(cmd), **summ)
        with open(excerpt_path, "w") as f:
            f.write("#### %s (%s, %.0f s, rc %s)\n$ %s\n%s\n"
                    % (name, status, res["seconds"], res["rc"], " ".join(cmd),
                       gpu_runner.sanitizer_excerpt(res["output"])))
    excerpts = [open(p).read() for p in (os.path.join(ctx.work, "sanitizer_%s.txt" % r[0])
                                         for r in runs) if os.path.exists(p)]
    with open(os.path.join(ctx.work, "sanitizer.txt"), "w") as f:
        f.write("\n".join(excerpts) or "no sanitizer run\n")
    statuses = [r["status"] for r in results.values()]
    if "failed" in statuses or "timeout" in statuses:
        status = "failed" if "failed" in statuses else "timeout"
    elif "passed" in statuses:
        status = "passed" if all(s == "passed" for s in statuses) else "partial"
    else:
        status = "skipped"
    return _result(status, total, None if status == "passed" else ", ".join(
        "%s %s" % (k, v["status"]) for k, v in results.items() if v["status"] != "passed"),
        tools=results, tool_path=tool_path)


def sanitizers_estimate(ctx):
    return estimate("sanitizer_tool", ctx)  # at least one tool must fit


# ---- bench ------------------------------------------------------------------------------------
def bench_chunks(ctx):
    """[(name, benchmark arguments, number of cases)] in priority order."""
    if ctx.dry_run:
        contiguous = bench_layouts().split(",")[0]  # every contiguous input: nc and nchw
        args = ["--device", "cpu", "--providers", "fusedbn,torch", "--modes", "fwd",
                "--dtypes", "float32", "--layouts", contiguous, "--shapes", "quick", "--repeats",
                "3", "--warmup", "1", "--threads", "2", "--load-threshold", "0",
                "--quiet-wait", "0", "--flush-mb", "8"]
        return [("dry_run_quick_fwd", args, count_cases("quick", "float32", "fwd", contiguous))]
    common = ["--device", "cuda", "--providers", "fusedbn,cudnn,torch_native,compile",
              "--layouts", bench_layouts(), "--check", "--warmup", "5", "--min-time",
              "0.1", "--min-repeats", "20", "--max-repeats", "200"]
    chunks = []
    for sets, dtype in GPU_BENCH_TRAIN:
        chunks.append(("%s_%s" % (sets, dtype), common + ["--shapes", sets, "--dtypes", dtype,
                                                          "--modes", "fwd,bwd,fwdbwd"],
                       count_cases(sets, dtype, "fwd,bwd,fwdbwd")))
    for sets, dtypes, modes in GPU_BENCH_EXTRA:
        chunks.append(("%s_%s" % (sets.replace(",", "_"), modes.replace(",", "-")),
                       common + ["--shapes", sets, "--dtypes", dtypes, "--modes", modes],
                       count_cases(sets, dtypes, modes)))
    return chunks


def bench_layouts():
    """Both memory formats, in the words of the benchmarks CLI at hand: 'contiguous' where it
    names memory formats (and labels 2-D/3-D inputs nc/ncl), 'nchw' where it does not."""
    from . import cases
    return ("contiguous" if hasattr(cases, "MEMORY_FORMATS") else "nchw") + ",channels_last"


def count_cases(sets, dtypes, modes, layouts=None):
    """The number of cases python -m benchmarks will run for these arguments."""
    from . import cases
    layouts = layouts or bench_layouts()
    return len(cases.make_cases(cases.expand_shape_sets(sets.split(",")), dtypes.split(","),
                                layouts.split(","), modes.split(",")))


def bench_estimate(ctx, cases):
    return estimate("bench_case", ctx) * cases + estimate("bench_chunk_overhead", ctx)


def stage_bench(ctx):
    done = ctx.state.setdefault("bench_chunks", {})
    results = {}
    os.makedirs(os.path.join(ctx.work, "bench"), exist_ok=True)
    for name, args, cases in bench_chunks(ctx):
        if done.get(name, {}).get("status") == "passed" and os.path.exists(done[name]["json"]):
            results[name] = dict(done[name], reused=True)
            continue
        est = bench_estimate(ctx, cases)
        if est > ctx.time_left():
            results[name] = _result("skipped", reason="%d cases need ~%.0f s, %.0f s left"
                                    % (cases, est, ctx.time_left()), cases=cases)
            continue
        out = os.path.join(ctx.work, "bench", name + ".json")
        cmd = [ctx.python, "-m", "benchmarks"] + args + ["--out", out, "--no-plot"]
        res = gpu_runner.run(cmd, ctx.log, env=ctx.env, cwd=ROOT, timeout=ctx.time_left())
        ok = res["rc"] == 0 and os.path.exists(out)
        results[name] = _result("passed" if ok else ("timeout" if res["timed_out"] else
                                                     "failed"), res["seconds"],
                                None if ok else "rc %s" % res["rc"], cases=cases, json=out,
                                command=" ".join(["python", "-m", "benchmarks"] + args))
        if ok:
            done[name] = results[name]
            per_case = max(res["seconds"] - estimate("bench_chunk_overhead", ctx), 0) / cases
            ctx.state["times"]["bench_case"] = round(max(per_case, 0.05), 3)
    docs = [json.load(open(r["json"])) for r in results.values() if r["status"] == "passed"]
    files = {}
    if docs:
        files = write_bench(ctx, merge_documents(docs, results))
    statuses = [r["status"] for r in results.values()]
    status = ("passed" if all(s == "passed" for s in statuses) else
              "failed" if "failed" in statuses else "partial" if docs else
              "timeout" if "timeout" in statuses else "skipped")
    return _result(status, sum(r.get("seconds", 0) for r in results.values()
                               if not r.get("reused")),
                   None if status == "passed" else ", ".join(
                       "%s %s" % (k, v["status"]) for k, v in results.items()
                       if v["status"] != "passed"), chunks=results, files=files,
                   cases=sum(r.get("cases", 0) for r in results.values()
                             if r["status"] == "passed"))


def merge_documents(docs, chunk_results):
    """One results document (benchmarks/report.py's schema) from the chunks' documents."""
    first = docs[0]
    cfg = dict(first["config"])
    for key in ("providers", "modes", "dtypes", "layouts", "shape_sets"):
        merged = []
        for d in docs:
            merged += [v for v in d["config"].get(key, []) if v not in merged]
        cfg[key] = merged
    cfg["command"] = "bash scripts/gpu_check.sh (bench stage: %d python -m benchmarks runs, " \
                     "see config.chunks)" % len(docs)
    cfg["chunks"] = [{"command": r["command"], "seconds": r["seconds"]}
                     for r in chunk_results.values() if r["status"] == "passed"]
    cfg["sweep_seconds"] = sum(d["config"].get("sweep_seconds", 0) for d in docs)
    bw = dict(first["copy_bandwidth"])
    bw["per_chunk_bytes_per_s"] = [d["copy_bandwidth"]["bytes_per_s"] for d in docs]
    records = [r for d in docs for r in d["records"]]
    return {"schema": first["schema"], "env": first["env"], "config": cfg,
            "copy_bandwidth": bw, "records": records}


def write_bench(ctx, doc):
    """bench.json, bench.png (matplotlib permitting) and bench.txt (the tables) in the work
    directory; returns the names written."""
    from . import plot, report
    json_path = os.path.join(ctx.work, "bench.json")
    report.write_json(doc, json_path)
    files = {"json": "bench.json"}
    png = os.path.join(ctx.work, "bench.png")
    if os.path.exists(png):
        os.remove(png)
    try:
        if plot.plot(doc, png):
            files["png"] = "bench.png"
    except Exception as e:  # a broken plot must not lose the numbers
        ctx.log.line("bench: plot failed: %s: %s" % (type(e).__name__, e))
    with open(os.path.join(ctx.work, "bench.txt"), "w") as f:
        report.print_report(doc, f, report.load_traffic())
    files["summary"] = [dict(e) for e in report.summary(doc) if e["mode"] == "all"]
    files["headline"] = report.headline(doc)
    return files


STAGES = {"build": stage_build, "quick": stage_quick, "tests": stage_tests,
          "sanitizers": stage_sanitizers, "bench": stage_bench}
ORDER = list(STAGES)


def stage_estimate(name, ctx):
    """Seconds the stage needs at least to be worth starting."""
    if name == "build":
        # Started whenever a minute is left: nothing runs without it, and ninja keeps what an
        # interrupted build compiled for the next command.
        if build_is_current(ctx)[0]:
            return estimate("build_reused", ctx)
        return min(estimate("build", ctx), 60)
    if name == "tests":
        return tests_estimate(ctx)
    if name == "sanitizers":
        return 0 if ctx.dry_run else sanitizers_estimate(ctx)
    if name == "bench":
        pending = [c for c in bench_chunks(ctx)
                   if ctx.state.get("bench_chunks", {}).get(c[0], {}).get("status") != "passed"]
        return min([bench_estimate(ctx, c[2]) for c in pending] or [0])
    return estimate(name, ctx)


if __name__ == "__main__":
    sys.exit("run benchmarks.gpu_check (scripts/gpu_check.sh), not this module")
