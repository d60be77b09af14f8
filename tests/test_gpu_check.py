"""scripts/gpu_check.sh without a GPU: its CPU dry run goes through the same stages (build reused,
tests/gpu, a tiny test subset, a 2-case benchmark, the sanitizer stage skipped with its reason),
keeps to the budget, resumes, leaves `git status` as it was, and `python -m benchmarks.ingest`
turns its output into results files and README sections -- all in temporary folders."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_check, gpu_runner, ingest  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def git_status():
    try:
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def dry_run(out, work, *extra, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), "--work", str(work),
                          *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    summary_path = os.path.join(str(out), "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    return res, summary


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    before = git_status()
    res, summary = dry_run(base / "out", base / "work")
    return dict(base=base, res=res, summary=summary, before=before, after=git_status())


def test_dry_run_passes_every_stage(dry):
    res, s = dry["res"], dry["summary"]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    st = s["stages"]
    assert s["dry_run"] is True
    assert st["build"]["status"] == "passed" and st["build"]["action"] == "reused"
    assert "cpu" in st["build"]["build_info"]["backends"]
    for name in ("quick", "tests"):
        assert st[name]["status"] == "passed", st[name]
        assert st[name]["counts"]["totals"]["passed"] > 0
        assert st[name]["counts"]["totals"]["failed"] == 0
    # the CUDA tests are collected and skipped with the reason
    quick = st["quick"]["counts"]
    assert quick["cuda"]["skipped"] >= 40 and quick["cuda"]["passed"] == 0
    assert any("needs CUDA" in r["reason"] for r in quick["skip_reasons"])
    assert st["sanitizers"]["status"] == "skipped" and "dry run" in st["sanitizers"]["reason"]
    assert "memcheck" in st["sanitizers"]["planned"]
    assert st["bench"]["status"] == "passed" and 1 <= st["bench"]["cases"] <= 2
    assert s["environment"]["tree_hash"] and s["elapsed_s"] < s["budget_s"]


def test_dry_run_output_directory(dry):
    out = dry["base"] / "out"
    names = set(os.listdir(out))
    assert {"summary.json", "summary.md", "log.txt", "junit.xml", "bench.json"} <= names
    assert names <= set(gpu_check.OUT_FILES) and len(names) <= 8  # what the device returns
    suites = ET.parse(out / "junit.xml").getroot().findall("testsuite")
    assert len(suites) == 2  # the quick and the tests stage
    bench = json.load(open(out / "bench.json"))
    assert {r["provider"] for r in bench["records"]} == {"fusedbn", "torch"}
    assert all(r.get("stats") for r in bench["records"])
    cases = {(tuple(r["shape"]), r["layout"], r["mode"]) for r in bench["records"]}
    assert len(cases) == json.load(open(out / "summary.json"))["stages"]["bench"]["cases"]
    md = (out / "summary.md").read_text()
    assert "| sanitizers | skipped |" in md and "| bench | passed |" in md


def test_dry_run_leaves_git_status_alone(dry):
    if dry["before"] is None:
        pytest.skip("no git checkout here")
    assert dry["after"] == dry["before"]


def test_resume_runs_only_what_did_not_finish(dry, tmp_path):
    work = dry["base"] / "work"
    res, s = dry_run(tmp_path / "out", work, "--resume")
    assert res.returncode == 0, res.stdout[-3000:]
    st = s["stages"]
    assert st["sanitizers"].get("from_earlier_run") is None  # the one stage that was skipped
    for name in ("build", "quick", "tests", "bench"):
        assert st[name]["from_earlier_run"], name
    assert (tmp_path / "out" / "bench.json").exists()  # carried over into the new directory


def test_budget_too_small_skips_with_reasons(tmp_path):
    res, s = dry_run(tmp_path / "out", tmp_path / "work", "--budget", "20")
    assert res.returncode == 0, res.stdout[-3000:]
    skipped = [r for r in s["stages"].values() if r["status"] == "skipped"]
    assert len(skipped) >= 3
    assert all("left of the 20 s budget" in r["reason"] or "dry run" in r["reason"]
               for r in skipped), skipped


def test_ingest_writes_results_and_readme(dry, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(open(os.path.join(ROOT, "README.md")).read())
    results = tmp_path / "results"
    out = str(dry["base"] / "out")
    with pytest.raises(SystemExit, match="dry run"):
        ingest.main([out, "--results", str(results), "--readme", str(readme)])
    ingest.main([out, "--allow-dry-run", "--results", str(results), "--readme", str(readme)])
    assert {"dryrun.json", "gpu_check_dryrun.json", "gpu_check_dryrun.md"} <= set(
        os.listdir(results))
    text = readme.read_text()
    devices = text.split("### Devices", 1)[1].split("\n#", 1)[0]
    assert "dry run on the CPU" in devices and "not yet run on a GPU" in devices
    perf = text.split("## Performance", 1)[1].split("\n## ", 1)[0]
    assert "Generated by" in perf and "512x256" in perf
    assert "## Development" in text  # the sections after it are kept


def test_devices_row_of_a_verified_gpu():
    ok = {"status": "passed", "seconds": 1}
    summary = {
        "kind": "fusedbn-gpu-check", "dry_run": False, "finished": "2026-12-02 10:00 UTC",
        "file": "gpu_check_h200.json",
        "environment": {"gpu_name": "NVIDIA H200", "cuda_capability": "9.0",
                        "torch_version": "2.11.0+cu130", "torch_cuda_version": "13.0",
                        "driver_version": "580.159.04", "git": {"commit": "a" * 40,
                                                                "dirty": False}},
        "stages": {"build": ok, "quick": dict(ok, counts={"gpu_tests": {
            "test_same_input_same_bits": {"passed": 12, "failed": 0, "skipped": 0},
            "test_more_than_2_31_elements": {"passed": 2, "failed": 0, "skipped": 0}}}),
            "tests": dict(ok, counts={"totals": {"passed": 5000, "failed": 0, "skipped": 10},
                                      "cuda": {"passed": 2500, "failed": 0, "skipped": 0}}),
            "sanitizers": dict(ok, tools={"memcheck": ok, "racecheck": ok, "initcheck": ok})},
        "cuda_dtypes": {d: {"passed": 10, "failed": 0} for d in ingest.DTYPES}}
    table = ingest.devices_table([summary])
    assert "not yet run" not in table
    row = [l for l in table.splitlines() if "H200" in l][0]
    assert "**verified** on commit aaaaaaaaaa" in row and "memcheck clean" in row
    assert "determinism holds" in row and "> 2^31 elements holds" in row
    assert "float32/float64/float16/bfloat16" in row
    summary["cuda_dtypes"]["float16"]["failed"] = 1
    assert "**partly verified**" in ingest.devices_table([summary])


def test_junit_counts_cuda_tests_by_property(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_parity" name="test_p[cuda-4x3-f16-params_f32]">'
        '<properties><property name="device" value="cuda"/></properties></testcase>'
        '<testcase classname="tests.test_parity" name="test_p[cpu-4x3-bf16-params_f32]"/>'
        '<testcase classname="tests.gpu.test_cuda_only" name="test_same_input_same_bits[a]">'
        '<properties><property name="device" value="cuda"/></properties>'
        '<failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    c = gpu_runner.read_junit(str(xml))
    assert c["totals"] == {"passed": 2, "failed": 1, "skipped": 0}
    assert c["cuda"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert c["cuda_dtypes"] == {"float16": {"passed": 1, "failed": 0}}
    assert c["gpu_tests"]["test_same_input_same_bits"]["failed"] == 1
    assert c["failed_tests"] == ["tests.gpu.test_cuda_only::test_same_input_same_bits[a]"]


def test_sanitizer_reports_are_attributed():
    out = ("========= COMPUTE-SANITIZER\n"
           "========= Invalid __global__ write of size 4 bytes\n"
           "=========     at void fusedbn::cuda::reduce_rows_kernel<float>()+0x70\n"
           "=========\n"
           "========= Uninitialized __global__ memory read of size 4 bytes\n"
           "=========     at void at::native::vectorized_elementwise_kernel()+0x10\n"
           "=========\n"
           "sanitizer_cases: 43 cases on cuda, 0 failed, 3.0 s\n"
           "========= ERROR SUMMARY: 2 errors\n")
    s = gpu_runner.sanitizer_summary(out)
    assert (s["errors"], s["reports_in_fusedbn"], s["reports_elsewhere"]) == (2, 1, 1)
    assert s["program_finished"] and s["cases"] == 43
    r = gpu_runner.sanitizer_summary(
        "sanitizer_cases: 43 cases on cuda, 0 failed, 3.0 s\n"
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert r["errors"] == 0 and r["racecheck"]["warnings"] == 0


def test_dtype_of_a_test_id():
    assert gpu_runner.input_dtype_of("t[cuda-16x5-bf16-params_f32]") == "bfloat16"
    assert gpu_runner.input_dtype_of("t[cuda-f16-params_f32]") == "float16"
    assert gpu_runner.input_dtype_of("t[cuda-torch.float64-x]") == "float64"
    assert gpu_runner.input_dtype_of("t[cuda-3]") is None


def gpu_context(tmp_path, *argv):
    """A Context as on a GPU machine (an H200's environment), for the parts that run without
    one."""
    args = gpu_check.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                                 *argv])
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    environment = {"cuda_capability": "9.0", "torch_version": "2.11.0+cu130",
                   "gpu_name": "NVIDIA H200", "tree_hash": "x"}
    state = {"stages": {}, "times": {}, "bench_chunks": {}}
    log = gpu_runner.Log(os.path.join(args.out, "log.txt"))
    env = dict(os.environ, PYTHONPATH=ROOT)
    return gpu_check.Context(args, log, state, environment, env)


def test_gpu_plan(tmp_path):
    from benchmarks import gpu_stages
    ctx = gpu_context(tmp_path)
    assert ctx.args.budget == gpu_check.DEFAULT_BUDGET < 600
    cfg = gpu_stages.build_config(ctx)
    assert cfg["TORCH_CUDA_ARCH_LIST"] == "9.0" and cfg["FORCE_CUDA"] == "1"
    assert int(cfg["MAX_JOBS"]) == os.cpu_count()
    assert gpu_stages.build_is_current(ctx)[0] is False  # never built for this GPU
    assert gpu_stages.stage_estimate("build", ctx) <= 60
    chunks = gpu_stages.bench_chunks(ctx)
    train = [c for c in chunks if "infer" not in c[0] and "bn1d" not in c[0]]
    assert len(train) == 9 and sum(c[2] for c in train) == 22 * 2 * 3 * 3
    for name, args, _ in train:
        assert "--device" in args and "cuda" in args and "--check" in args
        assert args[args.index("--providers") + 1] == "fusedbn,cudnn,torch_native,compile"
    assert train[0][0] == "unet_bfloat16"  # the smallest chunk first
    ctx.state["stages"]["quick"] = {"status": "passed"}
    ctx.state["stages"]["tests"] = {"status": "skipped"}
    ctx.args.resume = True
    assert gpu_check.selected_stages(ctx.args, ctx.state) == ["build", "tests", "sanitizers",
                                                              "bench"]


def test_sanitizer_stage_with_a_stand_in_tool(tmp_path, monkeypatch):
    """The sanitizer stage as on a GPU, with a stand-in compute-sanitizer that runs the cases on
    the CPU and prints the real tool's verdict lines: commands, parsing, sanitizer.txt."""
    from benchmarks import gpu_stages
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "while [ \"${1:0:2}\" = \"--\" ]; do shift; [ \"${1:0:2}\" = \"--\" ] || shift; done\n"
        "args=(); for a in \"$@\"; do [ \"$a\" = cuda ] && a=cpu; args+=(\"$a\"); done\n"
        "echo '========= COMPUTE-SANITIZER'\n"
        "\"${args[@]}\" --only planes_f32,rows_vec_f32; rc=$?\n"
        "echo '========= ERROR SUMMARY: 0 errors'\n"
        "exit $rc\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (fake.parent, os.pathsep, os.environ["PATH"]))
    ctx = gpu_context(tmp_path, "--no-large")
    res = gpu_stages.stage_sanitizers(ctx)
    assert res["status"] == "passed", res
    assert set(res["tools"]) == {"memcheck", "racecheck", "initcheck"}
    for tool in res["tools"].values():
        assert tool["errors"] == 0 and tool["cases"] == 2 and tool["program_finished"]
    text = open(os.path.join(ctx.work, "sanitizer.txt")).read()
    assert "#### racecheck (passed" in text and "--kernel-name kns=fusedbn" in text
