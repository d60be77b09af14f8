"""How it is measured: one timed call at a time, caches flushed, providers interleaved.

* CUDA: each call is bracketed by CUDA events on the current stream (the same method as
  triton.testing.do_bench, which cannot run an untimed setup -- the forward of the bwd mode --
  between repeats). Before each call a 256 MB buffer is rewritten, which evicts the 50 MB L2, so
  that tensors smaller than L2 are read from HBM as they are in a network; the flush kernel also
  gives the CPU time to queue the timed call's launches, so launch latency is not what is timed.
* CPU: time.perf_counter around the call (CPU ops are synchronous). A 64 MB buffer (more than the
  L3 of usual desktop and server parts) is rewritten before each call. The rewrite is an add (a read
  and a write through the cache), not a memset, which may use non-temporal stores that bypass it.
* CPU memory: by default (--allocator steady) glibc malloc is told, before anything is timed,
  never to give memory back to the OS (no mmap'd chunks, no heap trimming). Otherwise whether a
  freed 25 MB output is returned to the kernel, and its pages faulted in again by the next call
  (several ms for 25 MB on two cores), flips from call to call: samples of the same kernel were
  bimodal (3.4 ms / 12 ms) and medians depended on the allocation history, not the kernel. Every
  provider gets the same allocator; the cost of first-touching fresh pages is the operating
  system's, not the kernel's. This is what the jemalloc/tcmalloc setups that PyTorch recommends
  for CPU training achieve. --allocator default keeps glibc's own behaviour.
* Repeats are interleaved: round r times every provider once, in an order rotated each round, so
  a drift in machine load (other jobs, clocks) is shared by all providers instead of biasing one.
* On a CPU shared with other jobs (Linux), a round during which other processes took CPU time is
  discarded and run again (LoadMonitor), and each case first waits briefly for a quiet moment.
* The copy bandwidth that η divides by is the best of many copies: some before the sweep and, in
  every case, a few in the case's own timing rounds beside the providers (CopyProbe). One
  measurement at the start, taken while another job happened to run, once made η come out 1.8.
"""
import math
import os
import statistics
import time

import torch

FLUSH_MB = {"cuda": 256, "cpu": 64}
COPY_MB = {"cuda": 1024, "cpu": 256}
# The copies timed beside each case: buffers larger than the last-level cache (so each copy reads
# and writes memory, as the flushed kernels do) but small enough to time a few per case.
PROBE_MB = {"cuda": 512, "cpu": 64}
PROBES_PER_CASE = 4


# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def steady_allocator():
    """Makes glibc malloc keep freed memory (see the module docstring). Returns a description of
    what was set, or why nothing was (not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unchanged (no glibc mallopt)"
    ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(_M_TOP_PAD, 64 << 20) == 1)
    if not ok:
        return "unchanged (mallopt refused)"
    return "steady: glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_TOP_PAD=64MB"


class Timer:
    """Times single calls on one device, with the cache flushed before each (unless flush_mb=0)."""

    def __init__(self, device, flush_mb=None):
        self.device = device
        self.cuda = device.type == "cuda"
        mb = FLUSH_MB[device.type] if flush_mb is None else flush_mb
        self.flush_bytes = mb << 20
        self._buf = torch.zeros(self.flush_bytes, dtype=torch.uint8, device=device) if mb else None
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))

    def flush(self):
        """Evicts the last-level cache by rewriting a buffer larger than it."""
        if self._buf is not None:
            self._buf.add_(1)

    def sample(self, fn, setup=None, flush=True):
        """Seconds taken by one call of fn; setup() and the flush run before, untimed."""
        if setup is not None:
            setup()
        if flush:
            self.flush()
        if self.cuda:
            start, end = self._events
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            del out
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        del out
        return t1 - t0


def summarize(samples):
    """Statistics of a list of times in seconds: median, quartiles, IQR, min, max, mean, std, n,
    and the raw samples."""
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median_s": statistics.median(s), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
            "min_s": s[0], "max_s": s[-1], "mean_s": statistics.fmean(s),
            "std_s": statistics.stdev(s) if len(s) >= 2 else 0.0, "n": len(s),
            "samples_s": list(samples)}


def choose_repeats(estimates, min_time, min_repeats, max_repeats):
    """Repeats such that the slowest provider accumulates about min_time seconds, clamped."""
    slowest = max(estimates) if estimates else 0.0
    want = math.ceil(min_time / slowest) if slowest > 0 else max_repeats
    return max(min_repeats, min(max_repeats, want))


class LoadMonitor:
    """CPU time taken by *other* processes (Linux /proc/stat minus this process's share), so that
    timing rounds which shared the cores with another job can be run again: on a shared machine
    a multi-threaded kernel whose thread is descheduled waits a whole time slice at its barrier,
    which would bias the comparison against whichever provider uses more threads."""

    SLACK_TICKS = 2

    def __init__(self, threshold=0.25):
        self.threshold = threshold  # in cores
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    @staticmethod
    def available():
        return os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def _others_ticks(self):
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait (steal counts as busy)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return busy - int(fields[11]) - int(fields[12])  # minus our utime + stime

    def start(self):
        self._t0, self._o0 = time.perf_counter(), self._others_ticks()

    def others(self):
        """Cores used by other processes since start()."""
        wall = time.perf_counter() - self._t0
        return (self._others_ticks() - self._o0) / self.hz / max(wall, 1e-3)

    def busy(self):
        """Whether other processes used more than `threshold` cores since start(). The counters
        advance in ticks of 1/CLK_TCK s (10 ms) and this process's time is accounted apart from
        the CPUs', so a short window gets SLACK_TICKS ticks of slack."""
        wall = time.perf_counter() - self._t0
        return self._others_ticks() - self._o0 > (self.threshold * wall * self.hz
                                                  + self.SLACK_TICKS)

    def wait_quiet(self, max_s):
        """Waits (up to max_s seconds) for a 0.2 s window in which the others stay below the
        threshold; returns the seconds waited."""
        t0 = time.perf_counter()
        while True:
            self.start()
            time.sleep(0.2)
            if not self.busy() or time.perf_counter() - t0 >= max_s:
                return time.perf_counter() - t0


def collect_rounds(run_round, repeats, monitor=None):
    """Calls run_round(r) until `repeats` rounds are kept. With a monitor, a round during which
    other processes used the CPU is discarded and run again after a short wait for a quiet
    moment, at most max(3, repeats // 2) times (a burst of another job passes; a machine that
    stays busy does not, and waiting longer would only stretch the sweep); later contended
    rounds are kept and counted. Returns (kept results, contention counts)."""
    kept, info = [], {"discarded_rounds": 0, "contended_rounds_kept": 0}
    max_discards = max(3, repeats // 2)
    while len(kept) < repeats:
        if monitor:
            monitor.start()
        result = run_round(len(kept) + info["discarded_rounds"])
        if monitor and monitor.busy():
            if info["discarded_rounds"] < max_discards:
                info["discarded_rounds"] += 1
                monitor.wait_quiet(0.5)
                continue
            info["contended_rounds_kept"] += 1
        kept.append(result)
    return kept, info


class CopyProbe:
    """A copy between two buffers larger than the cache, timed beside the providers in a case's
    rounds: the copy bandwidth under the same conditions as the case's own timings."""

    def __init__(self, device, mb=None):
        n = (PROBE_MB[device.type] if mb is None else mb) << 20
        self.bytes = 2 * n  # read + written
        self._src = torch.ones(n, dtype=torch.uint8, device=device)
        self._dst = torch.empty_like(self._src)
        self._timer = Timer(device, flush_mb=0)
        self.samples = []

    def sample(self):
        return self._timer.sample(lambda: self._dst.copy_(self._src), flush=False)

    def best_bytes_per_s(self):
        return self.bytes / min(self.samples) if self.samples else None


def interleaved(timer, benches, repeats, monitor=None, probe=None):
    """Samples of every bench (name -> providers.Bench) over `repeats` rounds, the order rotated
    each round, each under its provider's settings. With a CopyProbe, PROBES_PER_CASE of the
    rounds (spread over the case) also time one copy, kept in probe.samples when the round is.
    Returns (name -> list of seconds, contention counts of collect_rounds)."""
    names = list(benches)
    every = max(1, repeats // PROBES_PER_CASE)

    def run_round(r):
        out = {}
        k = r % len(names)
        for name in names[k:] + names[:k]:
            b = benches[name]
            with b.provider.context():
                out[name] = timer.sample(b.fn, b.setup)
        if probe is not None and r % every == 0:
            out[None] = probe.sample()
        return out

    rounds, info = collect_rounds(run_round, repeats, monitor)
    if probe is not None:
        probe.samples.extend(r[None] for r in rounds if None in r)
    return {n: [r[n] for r in rounds] for n in names}, info


def copy_bandwidth(device, mb=None, repeats=None, monitor=None):
    """The device's copy bandwidth in bytes/s (bytes read + written), the best over repeats of a
    copy between two large buffers (rounds that shared the CPU run again, as in collect_rounds);
    with the statistics of the copy time. The sweep raises it to the best copy of its CopyProbe
    (see combine_bandwidth)."""
    mb = COPY_MB[device.type] if mb is None else mb
    repeats = repeats or (50 if device.type == "cuda" else 15)
    n = mb << 20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, flush_mb=0)  # the buffers are far larger than any cache
    for _ in range(3):
        timer.sample(lambda: dst.copy_(src), flush=False)
    samples, info = collect_rounds(lambda r: timer.sample(lambda: dst.copy_(src), flush=False),
                                   repeats, monitor)
    stats = summarize(samples)
    del src, dst
    return {"bytes_per_s": 2 * n / stats["min_s"], "buffer_bytes": n,
            "median_bytes_per_s": 2 * n / stats["median_s"],
            "method": "dst.copy_(src) of %d MB, bytes read + written, best of %d" % (mb, repeats),
            "stats": stats, "contention": info}


def combine_bandwidth(start, probe):
    """The copy bandwidth of the sweep: the best of the copies before it (copy_bandwidth) and
    those beside its cases (CopyProbe). Returns the start document with the probe's part."""
    out = dict(start)
    best = probe.best_bytes_per_s() if probe is not None else None
    out["start_bytes_per_s"] = start["bytes_per_s"]
    out["probe_samples"] = len(probe.samples) if probe is not None else 0
    out["probe_buffer_bytes"] = probe.bytes // 2 if probe is not None else None
    out["probe_best_bytes_per_s"] = best
    if best and best > start["bytes_per_s"]:
        out["bytes_per_s"] = best
    out["method"] = start["method"] + (
        "; and %d copies of %d MB beside the cases, in their timing rounds; the best of all"
        % (out["probe_samples"], out["probe_buffer_bytes"] >> 20) if out["probe_samples"] else "")
    return out
