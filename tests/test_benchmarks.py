"""The benchmark suite as a newcomer meets it (python -m benchmarks, the main job's short run):
it writes its results where git does not see them and says where, never into the committed
benchmarks/results/ unless asked; η is never reported above 1; old results files still read.

The run below is the main job's benchmark command (scripts/run.sh: --preset main --check) in a
copy of the working tree that is a git checkout of its own, shrunk to three small cases and two
providers so that it takes seconds."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import cases, report, runner, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results")
HAS_GIT = shutil.which("git") is not None and os.path.exists(os.path.join(ROOT, ".git"))


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def _main_job_command():
    """The benchmark command of scripts/run.sh's default run, from the script itself."""
    with open(os.path.join(ROOT, "scripts", "run.sh")) as f:
        m = re.search(r"^bench=\((.*)\)$", f.read(), re.M)
    assert m, "scripts/run.sh no longer sets bench=(...): update this test"
    return m.group(1).split()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A git checkout of the working tree (tracked and untracked-but-not-ignored files, plus the
    built extension), committed, with a fresh `python -m benchmarks` default run done in it.
    Returns (folder, completed process)."""
    if not HAS_GIT:
        pytest.skip("needs git and a git checkout of fusedbn")
    dst = tmp_path_factory.mktemp("checkout") / "fusedbn"
    files = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(dst / rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), dst / rel)
    for name in os.listdir(os.path.join(ROOT, "fusedbn")):  # the built extension (ignored)
        if name.endswith(".so") or name.endswith(".pyd"):
            shutil.copy2(os.path.join(ROOT, "fusedbn", name), dst / "fusedbn" / name)
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "snapshot")
    assert _git(dst, "status", "--porcelain") == ""
    # The main job's command, shrunk: 3 cases, fusedbn and torch eager, 3 repeats.
    cmd = [sys.executable, "-m", "benchmarks", *_main_job_command(),
           "--shapes", "quick", "--dtypes", "float32", "--modes", "fwd",
           "--providers", "fusedbn,torch", "--warmup", "1", "--repeats", "3", "--quiet-wait", "0"]
    env = dict(os.environ, PYTHONPATH=str(dst))
    proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dst, proc


def _written(proc):
    return re.findall(r"^wrote (\S+)", proc.stderr, re.M)


def test_main_job_run_leaves_git_status_clean(checkout):
    dst, proc = checkout
    assert _git(dst, "status", "--porcelain", "--untracked-files=all") == "", (
        "the default benchmark run changed or added files that git sees")
    written = _written(proc)
    assert written and written[0].endswith(".json"), proc.stderr[-2000:]
    for path in written:  # printed, relative to the checkout, under benchmarks/out/
        assert os.path.isfile(dst / path), path
        assert os.path.normpath(path).startswith(os.path.join("benchmarks", "out")), path
    assert _git(dst, "status", "--porcelain", "--ignored", "benchmarks/results") == ""


def test_main_job_run_writes_png_when_matplotlib_is_there(checkout):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (scripts/setup_env.sh "
                                             "installs it)")
    _, proc = checkout
    assert any(p.endswith(".png") for p in _written(proc)), proc.stderr[-2000:]


def test_fresh_run_eta_never_above_1(checkout):
    dst, proc = checkout
    doc = json.load(open(dst / _written(proc)[0]))
    timed = [r for r in doc["records"] if r.get("stats")]
    assert timed
    for r in timed:
        assert r["eta"] is None or 0 < r["eta"] <= 1.0, r
    bw = doc["copy_bandwidth"]
    assert bw["probe_samples"] > 0  # copies timed beside the cases
    assert bw["bytes_per_s"] >= bw["start_bytes_per_s"]
    assert doc["config"]["preset"] == "main"
    assert {r["layout"] for r in doc["records"]} == {"nchw", "channels_last", "nc"}


@pytest.mark.parametrize("path", sorted(
    os.path.join(COMMITTED, f) for f in os.listdir(COMMITTED) if f.endswith(".json")))
def test_committed_results_eta_never_above_1(path):
    docs = report.load_documents(path)
    for doc in docs:
        for r in doc["records"]:
            if r.get("eta") is not None:
                assert 0 < r["eta"] <= 1.0, (path, r["shape"], r["mode"], r["provider"], r["eta"])


def test_default_outputs_are_not_the_committed_results():
    for argv, expect in (([], "cpu.json"), (["--preset", "main"], "cpu-main.json"),
                         (["--quick"], "cpu-quick.json")):
        out = bench_main.default_out(bench_main.parse_args(argv), "cpu")
        assert os.path.normpath(out).endswith(os.path.join("benchmarks", "out", expect)), out
    out = bench_main.default_out(bench_main.parse_args(["--commit-results"]), "cpu")
    assert os.path.normpath(out).endswith(os.path.join("benchmarks", "results", "cpu.json"))
    for argv in (["--commit-results", "--quick"], ["--commit-results", "--preset", "main"],
                 ["--commit-results", "--out", "x.json"]):
        with pytest.raises(SystemExit):
            bench_main.parse_args(argv)


def test_out_folder_is_ignored_by_git():
    if not HAS_GIT:
        pytest.skip("needs git and a git checkout of fusedbn")
    probe = os.path.join("benchmarks", "out", "cpu-main.json")
    proc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert proc.returncode == 0, "%s is not git-ignored" % probe


def test_eta_above_1_is_flagged_not_reported():
    recs = [{"min_bytes": 100, "stats": {"median_s": 1.0}},
            {"min_bytes": 300, "stats": {"median_s": 1.0}}]
    runner.add_efficiency(recs, bandwidth=200.0)
    assert recs[0]["eta"] == 0.5 and "eta_above_1" not in recs[0]
    assert recs[1]["eta"] is None and recs[1]["eta_above_1"] == 1.5
    assert report.eta(recs[1]) is None and report.eta_flagged(recs[1])
    assert report.eta({"eta": 1.8}) is None and report.eta_flagged({"eta": 1.8})  # old files


def test_copy_bandwidth_is_the_best_copy():
    start = {"bytes_per_s": 10e9, "method": "m", "stats": {"n": 3}}

    class Probe:
        samples = [0.02, 0.01, 0.03]
        bytes = 2 * 100_000_000

        def best_bytes_per_s(self):
            return self.bytes / min(self.samples)

    bw = timing.combine_bandwidth(start, Probe())
    assert bw["bytes_per_s"] == pytest.approx(20e9) and bw["start_bytes_per_s"] == 10e9
    assert timing.combine_bandwidth({**start, "bytes_per_s": 30e9}, Probe())["bytes_per_s"] == 30e9


def test_layout_labels():
    made = cases.make_cases(["quick"], ["float32"], list(cases.MEMORY_FORMATS), ["fwd"])
    assert [(c.shape, c.layout) for c in made] == [
        ((8, 64, 28, 28), "nchw"), ((8, 64, 28, 28), "channels_last"), ((512, 256), "nc")]
    assert cases.layout_label(3, "contiguous") == "ncl"
    assert cases.layout_label(5, "contiguous") == "ncdhw"
    assert cases.layout_label(5, "channels_last") == "channels_last_3d"
    assert cases.layout_label(2, "channels_last") is None
    only = cases.make_cases(["quick"], ["float32"], ["nc"], ["fwd"])
    assert [c.layout for c in only] == ["nc"]
    assert cases.check_layouts(["nchw", "contiguous", "NHWC"]) == ["NHWC"]


def test_old_results_files_read_with_the_new_labels():
    """Files written before the labels called (N, C) cases 'nchw' (and 5-D channels_last_3d
    ones 'channels_last'); the report shows them as what they are."""
    doc = report.load_documents(os.path.join(COMMITTED, "cpu.json"))[0]
    old = copy.deepcopy(doc)
    extra = []
    for r in old["records"][:8]:
        for shape, layout in (([512, 256], "nchw"), ([4, 8, 2, 3, 3], "channels_last")):
            extra.append(dict(r, shape=shape, layout=layout))
    old["records"] += extra
    layouts = {k[3] for k in report.by_case(old["records"])}
    assert {"nc", "channels_last_3d", "nchw", "channels_last"} <= layouts
    headers, rows = report.summary_table(old)
    assert any(row[2] == "nc" for row in rows) and any(row[2] == "channels_last_3d"
                                                       for row in rows)
    assert report.markdown([old])  # the whole section renders


def test_report_on_committed_results():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--report"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "### CPU (`benchmarks/results/cpu.json`)" in out.stdout
    assert "| fwd | float32 | nchw |" in out.stdout


def _traffic_doc(records):
    doc = {"schema": 1, "env": {"git": {"commit": "0123456789abcdef"}}, "config": {},
           "records": records}
    doc["by_case"] = {(tuple(r["shape"]), r["dtype"], r["layout"], r["op"]): r
                      for r in records}
    return doc


def test_counted_traffic_beside_time_and_eta():
    """A CUDA document's case table shows fusedbn's counted traffic (benchmarks/results/
    traffic.json, python -m benchmarks.traffic) beside time and η: fwdbwd as fwd + bwd, '-'
    where a case was not counted; CPU documents (whose kernels the count is not of) do not."""
    cpu = report.load_documents(os.path.join(COMMITTED, "cpu.json"))[0]
    gpu = copy.deepcopy(cpu)
    gpu["env"]["device"] = "cuda"
    (_, shape, dtype, layout, _), _ = next(iter(report.by_case(gpu["records"]).items()))
    traffic = _traffic_doc([
        {"shape": list(shape), "dtype": dtype, "layout": layout, "op": "fwd", "bulk_x": 3.0},
        {"shape": list(shape), "dtype": dtype, "layout": layout, "op": "bwd", "bulk_x": 5.0}])
    headers, rows = report.case_table(gpu, traffic)
    assert headers[-1] == "counted |x|"
    col = {(r[0], r[1], r[2], r[3]): r[-1] for r in rows}
    label = "x".join(map(str, shape))
    assert col[("fwd", dtype, layout, label)] == "3.00"
    assert col[("bwd", dtype, layout, label)] == "5.00"
    assert col[("fwdbwd", dtype, layout, label)] == "8.00"
    assert col[("infer", dtype, layout, label)] == "-"
    assert any(v == "-" for k, v in col.items() if k[3] != label)
    assert "counted |x|" in report.traffic_note(gpu, traffic)
    assert "commit 0123456789" in report.markdown([gpu], traffic)
    headers, _ = report.case_table(cpu, traffic)
    assert "counted |x|" not in headers and report.traffic_note(cpu, traffic) == ""
    assert "counted |x|" not in report.case_table(gpu, None)[0]
