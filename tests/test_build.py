"""What was built and loaded: version, build_info(), and both compiled CPU kernel variants (the
portable one and the AVX2/FMA one), each exercised by the parity tests in a subprocess with
FUSEDBN_CPU_KERNELS forcing it."""
import importlib.util
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import fusedbn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version():
    with open(os.path.join(ROOT, "fusedbn", "version.py")) as f:
        declared = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    assert fusedbn.__version__ == declared
    assert fusedbn.build_info()["version"] == declared


def test_build_info():
    info = fusedbn.build_info()
    assert {"version", "backends", "cuda", "cuda_arch_list", "cuda_version", "torch_version",
            "cpu_kernels"} <= set(info)
    assert isinstance(info["backends"], tuple) and info["backends"][0] == "cpu"
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert info["cuda"] is ("cuda" in info["backends"])
    assert isinstance(info["cuda_arch_list"], str)
    if info["cuda"]:
        assert info["cuda_arch_list"] and info["cuda_version"] == torch.version.cuda
    else:
        assert info["cuda_arch_list"] == "" and info["cuda_version"] is None
    # compiled against the torch that runs it (a mismatch would be an ABI hazard)
    assert info["torch_version"] == torch.__version__
    assert info["cpu_kernels"] in ("avx2", "default")


def cpu_has_avx2():
    """AVX2 + FMA + F16C (what the avx2 variant is compiled with), read from the CPU itself."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
        return {"avx2", "fma", "f16c"} <= flags
    except (OSError, AttributeError):
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


HAS_AVX2_BUILD = importlib.util.find_spec("fusedbn._cpu_avx2") is not None


def test_cpu_kernels_env_is_honoured():
    """Run in the subprocesses below with FUSEDBN_CPU_KERNELS set; without it, the best variant
    this CPU supports must be the one loaded."""
    forced = os.environ.get("FUSEDBN_CPU_KERNELS")
    loaded = fusedbn.build_info()["cpu_kernels"]
    if forced:
        assert loaded == forced
    elif HAS_AVX2_BUILD and cpu_has_avx2():
        assert loaded == "avx2"
    else:
        assert loaded == "default"


# The parity grid (float32 and bfloat16-with-float32-parameters over every shape and layout),
# the options tests, the raw ops and the empty/NaN tests: every kernel of the variant runs.
SUBSET = [
    "tests/test_build.py::test_cpu_kernels_env_is_honoured",
    "tests/test_parity.py::test_module_parity_train",
    "tests/test_parity.py::test_module_parity_eval",
    "tests/test_parity.py::test_module_options_over_steps",
    "tests/test_ops.py",
    "tests/test_numerics.py::test_empty_batch",
    "tests/test_numerics.py::test_nan_inf_training",
]


def run_subset_with(variant):
    env = dict(os.environ, FUSEDBN_CPU_KERNELS=variant)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUBSET,
           "-k", "cpu and (f32-params_f32 or bf16-params_f32 or test_ops or empty or nan or "
                 "env_is_honoured) and not opcheck"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "FUSEDBN_CPU_KERNELS=%s:\n%s\n%s" % (
        variant, proc.stdout[-6000:], proc.stderr[-3000:])
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-2000:]


@pytest.mark.slow
def test_default_cpu_kernels():
    run_subset_with("default")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AVX2_BUILD, reason="this build has no AVX2 variant (not x86-64)")
@pytest.mark.skipif(not cpu_has_avx2(), reason="this CPU lacks AVX2/FMA/F16C")
def test_avx2_cpu_kernels():
    run_subset_with("avx2")


def test_cpu_variants_agree(tmp_path):
    """Both variants on one input in two subprocesses: results agree to float32 rounding (the
    vector widths differ, so the summation order does)."""
    if not (HAS_AVX2_BUILD and cpu_has_avx2()):
        pytest.skip("needs the AVX2 variant and an AVX2 CPU to compare the two variants")
    script = (
        "import torch, fusedbn, sys\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(5, 7, 33, 17, generator=g)\n"
        "dy = torch.randn(5, 7, 33, 17, generator=g)\n"
        "w, b = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)\n"
        "outs = []\n"
        "for xx in (x, x.contiguous(memory_format=torch.channels_last), x.bfloat16()):\n"
        "    y, m, i, v = torch.ops.fusedbn.forward_train(xx, w, b, 1e-5)\n"
        "    outs += [y, m, i, v, *torch.ops.fusedbn.backward(dy.to(xx.dtype), xx, w, m, i,"
        " True, [True, True, True])]\n"
        "torch.save(outs, sys.argv[1])\n")
    results = {}
    for variant in ("default", "avx2"):
        path = str(tmp_path / ("%s.pt" % variant))
        subprocess.run([sys.executable, "-c", script, path], check=True, cwd=ROOT,
                       env=dict(os.environ, FUSEDBN_CPU_KERNELS=variant), timeout=300)
        results[variant] = torch.load(path)
    for i, (a, b) in enumerate(zip(results["default"], results["avx2"])):
        if a.dtype == torch.bfloat16:  # one bfloat16 rounding of a value near a tie
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2, msg="result %d" % i)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg="result %d" % i)
