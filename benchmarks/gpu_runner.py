"""Plumbing of scripts/gpu_check.sh (benchmarks/gpu_check.py): running a command against a
deadline with its output streamed to the console and the log, and reading what pytest and
compute-sanitizer report (junit XML, summary lines)."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

LOG_LIMIT = 12 << 20  # bytes of log.txt; the device tool returns files of at most 16 MiB


class Log:
    """Everything printed, also written to a file (cut at LOG_LIMIT bytes)."""

    def __init__(self, path):
        self.path = path
        self.size = 0
        self.f = open(path, "a", encoding="utf-8", errors="replace") if path else None

    def write(self, text, echo=True):
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()
        if self.f is None:
            return
        if self.size + len(text) > LOG_LIMIT:
            if self.size <= LOG_LIMIT:
                self.f.write("\n[log cut at %d bytes]\n" % LOG_LIMIT)
                self.size = LOG_LIMIT + 1
            return
        self.f.write(text)
        self.f.flush()
        self.size += len(text)

    def line(self, text=""):
        self.write(text + "\n")


def run(cmd, log, env=None, cwd=None, timeout=None, keep=200000, echo=True):
    """Runs cmd (a list) in its own process group, streaming stdout+stderr to the log. At the
    timeout the group gets SIGINT (pytest then still writes its report), 20 s later SIGKILL.
    Returns dict(rc, seconds, timed_out, output) with the last `keep` characters of output."""
    log.write("$ %s\n" % " ".join(cmd), echo)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        log.write("could not start: %s\n" % e, echo)
        return {"rc": 127, "seconds": 0.0, "timed_out": False, "output": str(e)}
    chunks, size = [], [0]

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace")
            log.write(text, echo)
            chunks.append(text)
            size[0] += len(text)
            while size[0] > keep and len(chunks) > 1:
                size[0] -= len(chunks.pop(0))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.write("\n[timeout after %.0f s: interrupting]\n" % timeout, echo)
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "timed_out": timed_out, "output": "".join(chunks)}


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- pytest -----------------------------------------------------------------------------------
DTYPE_TOKENS = [("bfloat16", r"bf16|bfloat16"), ("float16", r"(?<![a-z])f16|float16|half"),
                ("float32", r"(?<![a-z])f32|float32"), ("float64", r"(?<![a-z])f64|float64")]


def input_dtype_of(test_id):
    """The first dtype named in a test id (the input's: 'f16-params_f32' is float16), or None."""
    best = None
    for name, pattern in DTYPE_TOKENS:
        m = re.search(pattern, test_id)
        if m and (best is None or m.start() < best[1]):
            best = (name, m.start())
    return best[0] if best else None


def is_cuda_test(case):
    """A junit testcase that runs on CUDA: tests/conftest.py gives those a property device=cuda
    (a `cuda` device parameter or the `cuda` mark); without it, a `cuda` parameter in the id."""
    for prop in case.iter("property"):
        if prop.get("name") == "device":
            return prop.get("value") == "cuda"
    return re.search(r"[\[-]cuda[\]-]", case.get("name", "")) is not None


def read_junit(path):
    """Counts of a pytest junit XML file: totals, CUDA tests, per input dtype on CUDA, per test
    function of tests/gpu, the most common skip reasons and the ids of failed tests (at most
    50)."""
    root = ET.parse(path).getroot()
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    cuda = {"passed": 0, "failed": 0, "skipped": 0}
    dtypes, failed, skip_reasons, gpu_tests = {}, [], {}, {}
    for case in root.iter("testcase"):
        tid = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            if len(failed) < 50:
                failed.append(tid)
        elif case.find("skipped") is not None:
            outcome = "skipped"
            msg = (case.find("skipped").get("message") or "")[:200]
            skip_reasons[msg] = skip_reasons.get(msg, 0) + 1
        else:
            outcome = "passed"
        totals[outcome] += 1
        if ".gpu." in "." + case.get("classname", ""):  # tests/gpu: per test function
            fn = case.get("name", "").split("[")[0]
            g = gpu_tests.setdefault(fn, {"passed": 0, "failed": 0, "skipped": 0})
            g[outcome] += 1
        if is_cuda_test(case):
            cuda[outcome] += 1
            dt = input_dtype_of(case.get("name", ""))
            if dt and outcome != "skipped":
                d = dtypes.setdefault(dt, {"passed": 0, "failed": 0})
                d[outcome] += 1
    top = sorted(skip_reasons.items(), key=lambda kv: -kv[1])[:10]
    return {"totals": totals, "cuda": cuda, "cuda_dtypes": dtypes, "failed_tests": failed,
            "gpu_tests": gpu_tests,
            "skip_reasons": [{"reason": r, "count": n} for r, n in top]}


def merge_junit(paths, out):
    """One junit file holding the test suites of several (those that exist)."""
    merged = ET.Element("testsuites")
    for p in paths:
        if p and os.path.exists(p):
            root = ET.parse(p).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            merged.extend(suites)
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


def pytest_tail(output):
    """pytest's final line ('== 3 passed, 2 skipped in 1.2s ==')."""
    lines = [l for l in output.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    return lines[-1].strip("= ").strip() if lines else None


# ---- compute-sanitizer -----------------------------------------------------------------------
def sanitizer_summary(output):
    """The tool's verdict: errors found (memcheck/initcheck 'ERROR SUMMARY: N errors', racecheck
    'RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)'), how many of the reported
    problems are in fusedbn's kernels, and whether the checked program finished."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", output)
    r = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warn",
                  output)
    errors = int(m.group(1)) if m else None
    hazards = None
    if r:
        hazards = {"displayed": int(r.group(1)), "errors": int(r.group(2)),
                   "warnings": int(r.group(3))}
        errors = int(r.group(2)) if errors is None else errors
    ours = others = 0
    for report in sanitizer_reports(output):
        if "fusedbn" in report:
            ours += 1
        else:
            others += 1
    m_cases = re.search(r"sanitizer_cases: (\d+) cases on \S+, (\d+) failed", output)
    return {"errors": errors, "racecheck": hazards, "reports_in_fusedbn": ours,
            "reports_elsewhere": others, "program_finished": m_cases is not None,
            "cases": int(m_cases.group(1)) if m_cases else None,
            "cases_failed": int(m_cases.group(2)) if m_cases else None,
            "summary_line": _summary_line(output)}


def _summary_line(output):
    lines = [l.lstrip("= ").strip() for l in output.splitlines()
             if re.match(r"=+ (ERROR|RACECHECK) SUMMARY", l)]
    return lines[-1] if lines else None


REPORT_START = re.compile(r"^=+ (Invalid|Uninitialized|Misaligned|Out.of.bounds|Error|Warning|"
                          r"Program hit|Cuda API error|Host API|Barrier|Race)", re.I)


def sanitizer_reports(output):
    """The tool's problem reports: each from its first line ('========= Invalid __global__ read',
    '========= Error: Race reported between ...') to the next report or an empty '=========' line;
    the final summary lines are not reports."""
    reports, current = [], None
    for line in output.splitlines():
        if not line.startswith("====="):
            continue
        body = line.lstrip("=").strip()
        if "SUMMARY" in body or body.startswith("COMPUTE-SANITIZER"):
            current = None
            continue
        if REPORT_START.match(line):
            current = [line]
            reports.append(current)
        elif not body:
            current = None
        elif current is not None:
            current.append(line)
    return ["\n".join(r) for r in reports]


def sanitizer_excerpt(output, lines=120):
    """The lines worth keeping of a tool's output: its own '=========' lines (first `lines`), the
    cases' result lines and the final verdicts."""
    tool = [l for l in output.splitlines() if l.startswith("=========")]
    cases = [l for l in output.splitlines()
             if re.match(r"\S+\s+(ok|FAILED) \(", l) or l.startswith(("sanitizer_cases:", "  "))]
    keep = tool[:lines] + (["... %d more tool lines" % (len(tool) - lines)]
                           if len(tool) > lines else [])
    return "\n".join(keep + cases[-80:])
