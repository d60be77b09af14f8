"""Loads the compiled parts of fusedbn: the operator library (fusedbn._C) and one variant of the
CPU kernels, chosen from what this CPU supports (override with FUSEDBN_CPU_KERNELS=default|avx2)."""
import importlib
import os

import torch

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "fusedbn's compiled extension is missing or does not match this torch "
        f"({torch.__version__}): rebuild it with `pip install --no-build-isolation .` "
        f"from the fusedbn source tree ({e})") from e

_VARIANTS = ("avx2", "default")


def _choose_cpu_variant():
    forced = os.environ.get("FUSEDBN_CPU_KERNELS", "").strip().lower()
    if forced:
        if forced not in _VARIANTS:
            raise ValueError(
                f"FUSEDBN_CPU_KERNELS must be one of {', '.join(_VARIANTS)}, got {forced!r}")
        return [forced]
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    return ["avx2", "default"] if capability in ("AVX2", "AVX512") else ["default"]


def _load_cpu_kernels():
    errors = []
    for variant in _choose_cpu_variant():
        try:
            return importlib.import_module(f"{__package__}._cpu_{variant}")
        except ImportError as e:
            errors.append(f"{variant}: {e}")
    raise ImportError("fusedbn: no CPU kernel variant could be loaded (" + "; ".join(errors) + ")")


_cpu = _load_cpu_kernels()


def build_info():
    """How this fusedbn was built and what it loaded: version, compiled backends, CUDA
    architectures and version, the torch it was compiled against, and the CPU kernel variant."""
    info = dict(_C.build_info())
    info["cpu_kernels"] = _cpu.variant
    return info
