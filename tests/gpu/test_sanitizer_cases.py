"""The sanitizer subset (sanitizer_cases.py) under pytest: on CUDA every case must match fusedbn's
CPU path; on any machine the cases must call every op that has a CUDA kernel, and the comparison
must tell a wrong result from a right one."""
import glob
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sanitizer_cases as sc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cuda_ops():
    """The op names registered for CUDA (m.impl("name", ...) in csrc/cuda/*register*.cu)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*register*.cu")):
        with open(path) as f:
            names.update(re.findall(r'm\.impl\("(\w+)"', f.read()))
    return names


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("fusedbn."):
            self.ops.add(name.split(".", 1)[1])
        return func(*args, **(kwargs or {}))


def test_cases_cover_every_cuda_op():
    registered = cuda_ops()
    assert len(registered) >= 10, "found only %s in csrc/cuda/*register*.cu" % sorted(registered)
    rec = OpRecorder()
    with rec:
        for name, fn in sc.CASES.items():
            fn(torch.device("cpu"))
    missing = registered - rec.ops
    assert not missing, "CUDA ops no sanitizer case calls: %s" % sorted(missing)


def test_case_names_name_their_path():
    """The docstring's prefixes are the only ones used, so the list reads as the kernel map."""
    prefixes = {"planes", "packed", "rows", "eval", "running", "sync", "act", "module", "empty",
                "large"}
    for name in list(sc.CASES) + list(sc.LARGE_CASES):
        assert name.split("_")[0] in prefixes, name


def test_compare_accepts_equal_and_rejects_different():
    fn = sc.CASES["planes_tail_bf16"]
    a, b = fn(torch.device("cpu")), fn(torch.device("cpu"))
    assert sc.compare("same", a, b) == []
    bad = dict(a, dx=a["dx"] * 1.5)
    assert any("dx" in m for m in sc.compare("off", bad, b))
    nan = dict(a, y=a["y"].clone())
    nan["y"].view(-1)[7] = float("nan")
    assert any("NaN" in m for m in sc.compare("nan", nan, b))
    empty = sc.CASES["empty_spatial"]
    assert sc.compare("empty", empty(torch.device("cpu")), empty(torch.device("cpu"))) == []


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(sc.CASES))
def test_case_on_cuda_matches_cpu(name):
    assert sc.run_case(name, "cuda") == []


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(sc.LARGE_CASES))
def test_large_case_on_cuda_matches_cpu(name):
    """More than 2^30 elements: the 64-bit index kernels (about 9 GB of GPU memory)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 << 30:
        pytest.skip("needs 16 GB of free GPU memory, %.1f GB free" % (free / 2**30))
    try:
        assert sc.run_case(name, "cuda") == []
    finally:
        torch.cuda.empty_cache()
