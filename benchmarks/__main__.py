"""python -m benchmarks: the fusedbn benchmark suite (see benchmarks/__init__.py).

Examples:
  python -m benchmarks --preset main --check          # the main job's short run (scripts/run.sh)
  python -m benchmarks --quick                        # smoke test, about a minute on a CPU
  python -m benchmarks --threads 2 --check            # CPU: the `cpu` shape set, all modes
  python -m benchmarks --threads 2 --check --commit-results   # the same, into benchmarks/results/
  python -m benchmarks --shapes resnet50 --modes fwd,bwd --providers fusedbn,cudnn
  python -m benchmarks --report --markdown perf.md    # README section from results/*.json

Results go to benchmarks/out/ (git-ignored) unless --out or --commit-results says otherwise:
benchmarks/results/ holds only the committed sweeps.
"""
import argparse
import os
import shlex
import sys
import time

import torch

from . import cases, environment, plot, report, runner, timing, verify
from .providers import configure_compile, default_providers, resolve_providers

HERE = os.path.dirname(os.path.abspath(__file__))
# Where runs write unless told otherwise (git-ignored), and where the committed sweeps live.
OUT_DIR = os.path.join(HERE, "out")
RESULTS_DIR = os.path.join(HERE, "results")
# Defaults per device type: (warmup, min_time_s, min_repeats, max_repeats). On the CPU a call's
# time spreads by 20-30% (IQR) from one repeat to the next; with 7-40 repeats per case the medians
# of two sweeps differed by up to 10% on the small layers, so the CPU sweep takes at least 15 and
# up to 100 (64 cases x 3 providers: about 5 minutes on 2 cores).
TIMING_DEFAULTS = {"cpu": (3, 0.75, 15, 100), "cuda": (10, 0.2, 25, 300)}
QUICK_TIMING = (2, 0.02, 3, 10)
# What each --preset runs: shape sets (None: the device's default), modes, dtypes (None: the
# device's default), timing (None: TIMING_DEFAULTS), seconds to wait for a quiet CPU per case.
# `main` is the main job's short run: 30 cases, each provider timed 10-25 times (the medians
# of the 64-case sweep's 15-100 repeats move by a few percent more), about 2 minutes on 2 cores.
PRESETS = {
    "full": {"shapes": None, "modes": list(cases.MODES), "dtypes": None, "timing": None,
             "quiet_wait": 3.0},
    "main": {"shapes": ["main"], "modes": ["fwd", "bwd", "fwdbwd"],
             "dtypes": ["float32", "bfloat16"], "timing": (2, 0.2, 10, 25), "quiet_wait": 0.5},
    "quick": {"shapes": ["quick"], "modes": list(cases.MODES), "dtypes": None,
              "timing": QUICK_TIMING, "quiet_wait": 0.5},
}


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda when available)")
    a("--providers", type=_csv, help="comma list of fusedbn, torch, cudnn, torch_native, "
      "compile (default: CPU fusedbn,torch,compile; CUDA fusedbn,cudnn,torch_native,compile)")
    a("--preset", choices=list(PRESETS), help="what to run: full (default: the device's shape "
      "sets, all modes), main (the main job's short run, about 2 minutes on 2 CPU cores) or "
      "quick (smoke test); --shapes, --modes, --dtypes and the timing options override it")
    a("--modes", type=_csv, help="comma list of "
      + "; ".join("%s: %s" % kv for kv in cases.MODE_HELP.items()))
    a("--dtypes", type=_csv, help="comma list of %s (default: float32,bfloat16 on the CPU, "
      "all three on CUDA)" % ",".join(cases.DTYPES))
    a("--layouts", type=_csv, default=list(cases.MEMORY_FORMATS), help="comma list of memory "
      "formats (contiguous, channels_last) or layout labels (%s); default: both formats"
      % ", ".join(cases.LAYOUTS))
    a("--shapes", type=_csv, help="comma list of shape sets %s or groups %s (default: cpu on "
      "the CPU, gpu on CUDA)" % (list(cases.SHAPE_SETS), list(cases.SHAPE_GROUPS)))
    a("--quick", action="store_true", help="the same as --preset quick: the `quick` shape set "
      "and few repeats (smoke test)")
    a("--threads", type=int, help="torch.set_num_threads (default: torch's, %d here)"
      % torch.get_num_threads())
    a("--warmup", type=int, help="warm-up calls per provider and case")
    a("--min-time", type=float, help="seconds of timed calls the slowest provider accumulates "
      "per case; sets the repeats between --min-repeats and --max-repeats")
    a("--repeats", type=int, help="exact number of timed calls per provider and case")
    a("--min-repeats", type=int)
    a("--max-repeats", type=int)
    a("--flush-mb", type=int, help="cache flush buffer (default 64 on the CPU, 256 on CUDA; "
      "0: no flush)")
    a("--allocator", choices=("steady", "default"), default="steady", help="CPU memory "
      "allocator: steady (default) keeps freed memory so that page faults of fresh outputs are "
      "not timed; default: glibc's own (see benchmarks/timing.py)")
    a("--load-threshold", type=float, help="CPU: discard and re-run a timing round during "
      "which other processes used more than this many cores (default 0.25; 0: off; Linux only)")
    a("--quiet-wait", type=float, help="CPU: seconds to wait at most for a quiet moment before "
      "each case (default 3, 0.5 with --quick)")
    a("--check", action="store_true", help="before timing, compare every provider's outputs "
      "with a float64 reference; providers that fail are not timed")
    a("--seed", type=int, default=0)
    a("--out", help="results JSON (default benchmarks/out/<device>[-<preset>].json, device cpu, "
      "h100, ...; benchmarks/out/ is git-ignored)")
    a("--commit-results", action="store_true", help="write the results into "
      "benchmarks/results/<device>.json (and .png), the files the README's performance section "
      "is generated from; full sweeps only")
    a("--plot", help="PNG path (default: the --out path with .png)")
    a("--no-plot", action="store_true")
    a("--report", action="store_true", help="do not measure: print the Markdown performance "
      "section generated from the results files")
    a("--results", default=os.path.join(os.path.relpath(HERE), "results", "*.json"),
      help="glob of the results files read by --report (default %(default)s)")
    a("--markdown", help="with --report: write the Markdown to this file instead of stdout")
    args = p.parse_args(argv)
    if args.quick:
        if args.preset not in (None, "quick"):
            p.error("--quick is --preset quick; it cannot go with --preset %s" % args.preset)
        args.preset = "quick"
    args.preset = args.preset or "full"
    if args.commit_results and (args.out or args.preset != "full"):
        p.error("--commit-results writes the full sweep to benchmarks/results/<device>.json: "
                "it takes neither --out nor --preset %s" % args.preset)
    return args


def do_report(args):
    docs = report.load_documents(args.results)
    if not docs:
        raise SystemExit("--report: no results files match %s" % args.results)
    text = report.markdown(docs, report.load_traffic())
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
        print("wrote %s from %d results files" % (args.markdown, len(docs)), file=sys.stderr)
    else:
        sys.stdout.write(text)


def sweep_config(args, device):
    """Fills in the device-dependent defaults; returns (SweepConfig, list of cases)."""
    preset = PRESETS[args.preset]
    warmup, min_time, lo, hi = preset["timing"] or TIMING_DEFAULTS[device.type]
    try:
        shape_sets = cases.expand_shape_sets(
            args.shapes or preset["shapes"] or cases.default_shape_sets(device.type))
    except ValueError as e:
        raise SystemExit("--shapes: %s" % e)
    dtypes = args.dtypes or preset["dtypes"] or (["float32", "bfloat16"] if device.type == "cpu"
                                                 else list(cases.DTYPES))
    modes = args.modes or preset["modes"]
    for name, values, known in (("modes", modes, cases.MODES),
                                ("dtypes", dtypes, cases.DTYPES)):
        bad = [v for v in values if v not in known]
        if bad:
            raise SystemExit("--%s: unknown %s (known: %s)" % (name, bad, ", ".join(known)))
    bad = cases.check_layouts(args.layouts)
    if bad:
        raise SystemExit("--layouts: unknown %s (known: %s)" % (
            bad, ", ".join(dict.fromkeys(cases.MEMORY_FORMATS + cases.LAYOUTS))))
    try:
        providers = resolve_providers(args.providers or default_providers(device.type),
                                      device.type)
    except ValueError as e:
        raise SystemExit("--providers: %s" % e)
    cfg = runner.SweepConfig(
        device=device, providers=providers,
        warmup=args.warmup if args.warmup is not None else warmup,
        min_time=args.min_time if args.min_time is not None else min_time,
        repeats=args.repeats, min_repeats=args.min_repeats or lo,
        max_repeats=args.max_repeats or hi, check=args.check, seed=args.seed,
        monitor=load_monitor(args, device),
        quiet_wait=args.quiet_wait if args.quiet_wait is not None else preset["quiet_wait"],
        probe=timing.CopyProbe(device))
    case_list = cases.make_cases(shape_sets, dtypes, args.layouts, modes)
    if not case_list:
        raise SystemExit("no cases: --layouts %s does not apply to the shape sets %s"
                         % (",".join(args.layouts), ",".join(shape_sets)))
    meta = {"preset": args.preset, "shape_sets": shape_sets, "dtypes": dtypes,
            "layouts": args.layouts, "modes": modes, "providers": [p.name for p in providers]}
    return cfg, case_list, meta


def load_monitor(args, device):
    """A LoadMonitor for CPU runs on Linux (see timing.LoadMonitor), unless switched off."""
    threshold = 0.25 if args.load_threshold is None else args.load_threshold
    if device.type != "cpu" or threshold <= 0 or not timing.LoadMonitor.available():
        return None
    return timing.LoadMonitor(threshold)


def default_out(args, slug):
    """benchmarks/results/<slug>.json with --commit-results; otherwise benchmarks/out/<slug>.json
    (<slug>-main.json, <slug>-quick.json for the presets), which git ignores."""
    if args.commit_results:
        return os.path.join(os.path.relpath(RESULTS_DIR), slug + ".json")
    suffix = "" if args.preset == "full" else "-" + args.preset
    return os.path.join(os.path.relpath(OUT_DIR), slug + suffix + ".json")


def _warn_if_busy(cfg):
    """A warning on stderr when other processes are using the CPU as the sweep starts."""
    if cfg.monitor:
        cfg.monitor.start()
        time.sleep(0.5)
        busy = cfg.monitor.others()
        if busy > cfg.monitor.threshold:
            print("warning: other processes are using %.1f cores; contended timing rounds are "
                  "re-run, up to a limit, and counted in the results" % busy, file=sys.stderr)


def _sweep_load(cfg):
    """A LoadMonitor over the whole sweep (its others() at the end: the cores that other
    processes used on average meanwhile), or None where there is none."""
    if not cfg.monitor:
        return None
    return timing.LoadMonitor(cfg.monitor.threshold)


def _config_record(args, cfg, meta, timer, seconds):
    """The 'config' section of the results: what ran and how it was measured."""
    command = "python -m benchmarks " + " ".join(map(shlex.quote, sys.argv[1:]))
    return dict(meta, command=command, quick=args.preset == "quick", check=cfg.check,
                seed=cfg.seed,
                warmup=cfg.warmup, min_time_s=cfg.min_time, repeats=cfg.repeats,
                min_repeats=cfg.min_repeats, max_repeats=cfg.max_repeats,
                flush_bytes=timer.flush_bytes,
                timer="cuda events" if cfg.device.type == "cuda" else "time.perf_counter",
                memory_method=verify.MEMORY_METHOD[cfg.device.type], sweep_seconds=seconds,
                load_threshold=cfg.monitor and cfg.monitor.threshold,
                quiet_wait_s=cfg.quiet_wait if cfg.monitor else None,
                load_average_at_end=environment.load_average())


def _save(args, doc):
    """Writes the JSON and, unless --no-plot, the PNG beside it."""
    out = args.out or default_out(args, doc["env"]["device_slug"])
    report.write_json(doc, out)
    print("\nwrote %s (sweep took %.0f s)" % (out, doc["config"]["sweep_seconds"]),
          file=sys.stderr)
    if not args.no_plot:
        png = args.plot or os.path.splitext(out)[0] + ".png"
        if plot.plot(doc, png):
            print("wrote %s" % png, file=sys.stderr)
    for line in report.contention_note(doc)[:1]:
        if line.startswith("warning:"):  # repeated last, where it is seen
            print(line, file=sys.stderr)


def measure(args):
    """The sweep: environment, copy bandwidth, every case; then table, JSON and plot."""
    device = environment.pick_device(args.device)
    if device.index is not None:
        torch.cuda.set_device(device)
    allocator = "default"
    if device.type == "cpu" and args.allocator == "steady":
        allocator = timing.steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, case_list, meta = sweep_config(args, device)
    if any(p.compiled for p in cfg.providers):
        configure_compile()
    torch.manual_seed(args.seed)
    env = environment.collect(device, torch.get_num_threads())
    print(environment.describe(env), file=sys.stderr)
    print("%d cases x %d providers" % (len(case_list), len(cfg.providers)), file=sys.stderr)
    _warn_if_busy(cfg)

    t0 = time.perf_counter()
    load = _sweep_load(cfg)
    bandwidth = timing.copy_bandwidth(device, monitor=cfg.monitor)
    print("copy bandwidth %.1f GB/s (best of %d copies; the copies timed beside each case may "
          "raise it)" % (bandwidth["bytes_per_s"] / 1e9, bandwidth["stats"]["n"]),
          file=sys.stderr)
    timer = timing.Timer(device, args.flush_mb)
    records, bandwidth = runner.run_sweep(case_list, cfg, timer, bandwidth)
    config = _config_record(args, cfg, meta, timer, time.perf_counter() - t0)
    config["allocator"] = allocator
    config["others_cores_during_sweep"] = load.others() if load else None
    doc = {"schema": report.SCHEMA, "env": env, "config": config,
           "copy_bandwidth": bandwidth, "records": records}
    report.print_report(doc, sys.stdout, report.load_traffic())
    _save(args, doc)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        do_report(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
