"""Shared fixtures: the `device` parameter, the `cuda` marker and a fixed seed per test.

Every test that takes `device` runs on the CPU and, when there is a GPU and fusedbn was built with
its CUDA kernels, on CUDA too. Tests marked `cuda` only make sense on a GPU; they are skipped with
the reason spelled out when there is none.
"""
import zlib

import pytest
import torch

import fusedbn


def _cuda_status():
    """(usable, reason): whether fusedbn's CUDA kernels can be exercised here, and why not."""
    backends = tuple(fusedbn.build_info()["backends"])
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if "cuda" not in backends:
        return False, "fusedbn was built without CUDA kernels (backends=%r)" % (backends,)
    return True, ""


CUDA_OK, CUDA_SKIP_REASON = _cuda_status()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason="needs CUDA: " + CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_itemcollected(item):
    """Names the device of CUDA tests in the junit report (scripts/gpu_check.sh counts them)."""
    spec = getattr(item, "callspec", None)
    on_cuda = spec is not None and spec.params.get("device") == "cuda"
    if on_cuda or item.get_closest_marker("cuda"):
        item.user_properties.append(("device", "cuda"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """A seed fixed per test (derived from its id), so that a failure reproduces on its own."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
