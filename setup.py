"""Build fusedbn: the operator library (fusedbn._C, with the CUDA kernels when CUDA is built) and
the C++ CPU kernels, compiled twice -- portable (fusedbn._cpu_default) and AVX2/FMA
(fusedbn._cpu_avx2, x86-64 only) -- so that one install runs fast on a modern CPU and still runs on
an old one. fusedbn/_ext.py loads the variant that the CPU supports.

Environment:
  FUSEDBN_CPU_ONLY=1   never build CUDA kernels
  FORCE_CUDA=1         build CUDA kernels even without a visible GPU (needs a CUDA build of torch
                       and a CUDA toolkit)
  TORCH_CUDA_ARCH_LIST e.g. "9.0" or "8.0;9.0+PTX" (honoured by torch.utils.cpp_extension)
  MAX_JOBS             parallel compile jobs (honoured by ninja through torch.utils.cpp_extension)
  FUSEDBN_DEBUG_INFO=1 keep -g (debug info): by default it is dropped (-g0), which changes no
                       instruction of the code but takes a third off the compile time

What is compiled how often (the build's time is the CPU kernels' template instantiations):
  csrc/*.cpp                  once, into fusedbn._C
  csrc/cpu/*.cpp              once per CPU variant (the kernels: hot, vectorized per instruction set)
  CPU_ONCE below              once, with the portable flags, and linked into every variant: the
                              kernel registration and the C-value running-statistics update, which
                              gain nothing from AVX2
  csrc/cpu/module.cpp         per variant, but a few lines of CPython API (the module's name)

`pip install -v --no-build-isolation .` shows ninja's [k/n] line for every unit it compiles.
"""
import glob
import os
import platform
import re
import sys

from setuptools import setup

try:
    import torch
except ImportError as e:  # pip's isolated build environment has no torch
    raise SystemExit(
        "fusedbn builds against the torch you have installed: install torch first, then run "
        "`pip install --no-build-isolation .` (the flag lets the build see that torch)") from e
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Not hot and nothing to vectorize: compiled once, with the first (portable) variant, whose objects
# the other variants link (see BuildExtensionPerTarget).
CPU_ONCE = ["csrc/cpu/register.cpp", "csrc/cpu/bn_running_stats.cpp"]


def read_version():
    with open(os.path.join(ROOT, "fusedbn", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    """Returns (build_cuda, reason)."""
    if env_flag("FUSEDBN_CPU_ONLY"):
        return False, "FUSEDBN_CPU_ONLY=1"
    force = env_flag("FORCE_CUDA")
    if torch.version.cuda is None:
        if force:
            raise RuntimeError(
                "FORCE_CUDA=1 but the installed torch (%s) is a CPU-only build; install a CUDA "
                "build of torch first, or unset FORCE_CUDA" % torch.__version__)
        return False, "torch %s has no CUDA" % torch.__version__
    if CUDA_HOME is None:
        if force:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME (for example "
                "CUDA_HOME=/usr/local/cuda) or unset FORCE_CUDA")
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if force:
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "torch has CUDA %s and a GPU is visible" % torch.version.cuda
    return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"


def cuda_arch_list():
    """The architectures the CUDA build targets, for fusedbn.build_info()."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags  # what cpp_extension will pass
    archs = []
    for flag in _get_cuda_arch_flags():
        m = re.search(r"code=(sm|compute)_(\d+a?)", flag)
        if m:
            archs.append(("sm_" if m.group(1) == "sm" else "compute_") + m.group(2))
    return ";".join(dict.fromkeys(archs))


class BuildExtensionPerTarget(BuildExtension):
    """The CPU kernels are compiled once per instruction set from the same sources; give every
    extension its own object folder so that the objects of one variant never stand in for the
    other's. An extension with `objects_from = (other extension's name, sources)` links those
    sources' objects as the other extension compiled them (it must come earlier in the list)."""

    def build_extension(self, ext):
        base = self.build_temp
        shared = getattr(ext, "objects_from", None)
        if shared:
            donor, sources = shared
            objects = self.compiler.object_filenames(
                sources, output_dir=os.path.join(base, donor.replace(".", "_")))
            missing = [o for o in objects if not os.path.exists(o)]
            if missing:
                raise RuntimeError("fusedbn build: %s links objects of %s that were not built: %s"
                                   % (ext.name, donor, ", ".join(missing)))
            ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.depends = list(ext.depends or []) + objects  # relink when they change
        self.build_temp = os.path.join(base, ext.name.replace(".", "_"))
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


def main():
    version = read_version()
    build_cuda, reason = want_cuda()
    common_cxx = ["-O3", "-DFUSEDBN_VERSION=\"%s\"" % version,
                  "-DFUSEDBN_TORCH_VERSION=\"%s\"" % torch.__version__]
    debug_info = env_flag("FUSEDBN_DEBUG_INFO")
    if not debug_info:
        # Python's own CFLAGS carry -g: debug info for these templates is most of the objects'
        # size (35 MB per variant) and a third of the compile time. -g0, after it, wins.
        common_cxx.append("-g0")
    include_dirs = [os.path.join(ROOT, "csrc")]

    extensions = []
    lib_sources = ["csrc/schema.cpp", "csrc/composite.cpp", "csrc/bindings.cpp", "csrc/eager.cpp"]
    arch = ""
    if build_cuda:
        arch = cuda_arch_list()
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        cuda_defs = ["-DFUSEDBN_WITH_CUDA", "-DFUSEDBN_CUDA_ARCH_LIST=\"%s\"" % arch,
                     "-DFUSEDBN_CUDA_VERSION=\"%s\"" % torch.version.cuda]
        extensions.append(CUDAExtension(
            "fusedbn._C", lib_sources + cuda_sources, include_dirs=include_dirs,
            extra_compile_args={
                "cxx": common_cxx + cuda_defs,
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + cuda_defs,
            }))
    else:
        extensions.append(CppExtension(
            "fusedbn._C", lib_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": common_cxx}))

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    hot_sources = [s for s in cpu_sources if s not in CPU_ONCE]
    variants = [("default", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants.append(("avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                                  "-DCPU_CAPABILITY_AVX2"]))
    # at::parallel_for is an inline `#pragma omp parallel`: without OpenMP the CPU kernels would
    # silently run on one thread. libgomp resolves to the copy torch has already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    for i, (name, flags) in enumerate(variants):
        ext = CppExtension(
            "fusedbn._cpu_" + name, cpu_sources if i == 0 else hot_sources,
            include_dirs=include_dirs, extra_compile_args={"cxx": common_cxx + openmp + flags},
            extra_link_args=openmp)
        if i > 0:
            ext.objects_from = ("fusedbn._cpu_" + variants[0][0], CPU_ONCE)
        extensions.append(ext)

    print("fusedbn %s build configuration:" % version)
    print("  torch %s (CUDA %s)" % (torch.__version__, torch.version.cuda))
    print("  CPU kernels: %s (%s compiled once)" % (", ".join(name for name, _ in variants),
                                                   ", ".join(os.path.basename(s) for s in CPU_ONCE)))
    print("  CUDA kernels: %s (%s)%s" % ("yes" if build_cuda else "no", reason,
                                         ", arch " + arch if build_cuda else ""))
    print("  MAX_JOBS=%s, debug info %s" % (os.environ.get("MAX_JOBS", "(ninja default)"),
                                            "on (FUSEDBN_DEBUG_INFO=1)" if debug_info else "off"))
    sys.stdout.flush()  # before the compiler's output, also when stdout is a pipe (pip -v)

    setup(
        name="fusedbn",
        version=version,
        description="Fused batch normalization for PyTorch: C++ and CUDA kernels, drop-in modules",
        packages=["fusedbn"],
        ext_modules=extensions,
        cmdclass={"build_ext": BuildExtensionPerTarget.with_options(use_ninja=True)},
        python_requires=">=3.9",
        zip_safe=False,
    )


main()
