"""The sweep: for each case, build every provider, check it, warm it up, time all providers
interleaved, account memory, and turn the samples into result records."""
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from . import timing, verify
from .cases import make_inputs
from .providers import make_bench, run_outputs


@dataclass
class SweepConfig:
    """The knobs of a sweep (see the command-line help in __main__)."""

    device: torch.device
    providers: list
    warmup: int
    min_time: float
    repeats: Optional[int]
    min_repeats: int
    max_repeats: int
    check: bool
    seed: int = 0
    monitor: Optional[timing.LoadMonitor] = None  # CPU: re-run rounds shared with other jobs
    quiet_wait: float = 0.0  # seconds to wait for a quiet CPU before each case
    probe: Optional[timing.CopyProbe] = None  # copies timed beside each case (copy bandwidth)


def _error_text(e):
    lines = traceback.format_exception_only(type(e), e)
    return "".join(lines).strip().splitlines()[-1][:500] if lines else repr(e)


class Progress:
    """A progress line on stderr: case k of n, elapsed time and an estimate of what is left."""

    def __init__(self, total):
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done, label):
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else 0.0
        line = "[%d/%d] %-48s elapsed %4.0fs, ~%4.0fs left" % (done, self.total, label[:48],
                                                                elapsed, left)
        sys.stderr.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        if self.tty and done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _build(case, cfg, inputs, records):
    """The Bench of every provider that can be built (others get an error)."""
    benches = {}
    for p in cfg.providers:
        try:
            benches[p.name] = make_bench(p, case, inputs)
        except Exception as e:
            records[p.name]["error"] = _error_text(e)
    return benches


def _check(case, inputs, benches, records):
    """--check: runs each bench once against the float64 reference; drops those that fail."""
    ref, base = verify.reference_outputs(case, inputs)
    for name in list(benches):
        try:
            chk = verify.check_outputs(case, run_outputs(benches[name]), ref, base)
        except Exception as e:
            chk = {"passed": False, "outputs": {}, "exception": _error_text(e)}
        records[name]["check"] = chk
        if not chk["passed"]:
            records[name]["error"] = chk.get("exception") or verify.describe_failure(chk)
            del benches[name]


def _warm_up(cfg, timer, benches, records):
    """Warm-up calls (the first may compile); returns the time estimates of the benches that
    ran, dropping those that raised."""
    estimates = []
    for name in list(benches):
        b = benches[name]
        try:
            with b.provider.context():
                warm = [timer.sample(b.fn, b.setup) for _ in range(max(cfg.warmup, 1))]
            estimates.append(min(warm[1:] or warm))
        except Exception as e:
            records[name]["error"] = _error_text(e)
            del benches[name]
    return estimates


def _measure(cfg, timer, benches, records, inputs, estimates):
    """Times the benches interleaved, then accounts their memory."""
    contention = {}
    if cfg.monitor and cfg.quiet_wait > 0:
        contention["waited_s"] = cfg.monitor.wait_quiet(cfg.quiet_wait)
    repeats = cfg.repeats or timing.choose_repeats(estimates, cfg.min_time, cfg.min_repeats,
                                                   cfg.max_repeats)
    samples, info = timing.interleaved(timer, benches, repeats, cfg.monitor, cfg.probe)
    contention.update(info)
    for name, b in benches.items():
        rec = records[name]
        rec["stats"] = timing.summarize(samples[name])
        rec["contention"] = contention if cfg.monitor else None
        try:
            rec["memory_bytes"] = verify.memory_bytes(b, cfg.device, inputs)
        except Exception as e:
            rec["memory_bytes"] = None
            rec["memory_error"] = _error_text(e)


def run_case(case, cfg, timer):
    """Measures every provider on one case; returns one record per provider (with an error
    instead of statistics for a provider that could not be built, checked or run)."""
    inputs = make_inputs(case, cfg.device, cfg.seed)
    records = {p.name: {**case.key(), "provider": p.name, "x_bytes": case.x_bytes,
                        "min_bytes": case.min_bytes, "error": None}
               for p in cfg.providers}
    benches = _build(case, cfg, inputs, records)
    if cfg.check and benches:
        _check(case, inputs, benches, records)
    estimates = _warm_up(cfg, timer, benches, records)
    if benches:
        _measure(cfg, timer, benches, records, inputs, estimates)
    return list(records.values())


def add_efficiency(records, bandwidth):
    """η = minimal bytes / (median time x copy bandwidth), for every timed record. A value above
    1 is not an efficiency (the copy bandwidth was under-measured, or the data stayed in cache):
    such a record gets eta None and the value in eta_above_1 (see report.eta)."""
    for r in records:
        if r.get("stats"):
            value = r["min_bytes"] / (r["stats"]["median_s"] * bandwidth)
            r["eta"] = value if value <= 1.0 else None
            if value > 1.0:
                r["eta_above_1"] = value


def run_sweep(cases, cfg, timer, bandwidth):
    """Runs all cases; returns the flat list of records (one per case and provider) and the copy
    bandwidth document (the start measurement `bandwidth` raised to the best copy timed beside
    the cases), by which η is computed once all cases are in."""
    progress = Progress(len(cases))
    records = []
    for i, case in enumerate(cases):
        progress.update(i, case.label)
        records.extend(run_case(case, cfg, timer))
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    progress.update(len(cases), "done")
    bandwidth = timing.combine_bandwidth(bandwidth, cfg.probe)
    add_efficiency(records, bandwidth["bytes_per_s"])
    return records, bandwidth
