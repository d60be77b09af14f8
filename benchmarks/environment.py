"""Where it is measured: the machine, the software and the commit, recorded with every result."""
import os
import platform
import re
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(name):
    """torch.device from --device ('auto': CUDA when available, else the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device %s: torch sees no CUDA device" % name)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit("--device must be cpu or cuda, got %s" % name)
    return device


def device_slug(device):
    """Short name of the device for the results file: cpu, h100, h200, a100, ..."""
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def _run(cmd):
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_info():
    """The commit of the working tree and whether it has uncommitted changes."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    """The 1-, 5- and 15-minute load averages (other jobs on the machine make timings noisy)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def fusedbn_info():
    """fusedbn.build_info(), or the reason it could not be imported."""
    try:
        import fusedbn
        return dict(fusedbn.build_info())
    except Exception as e:  # recorded, not raised: the other providers still run
        return {"error": "%s: %s" % (type(e).__name__, e)}


def collect(device, threads):
    """Everything about the machine and software that a result depends on."""
    info = {
        "device": device.type,
        "device_slug": device_slug(device),
        "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "fusedbn": fusedbn_info(),
        "git": git_info(),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "cuda_capability": "%d.%d" % (props.major, props.minor),
            "gpu_memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "cudnn_version": torch.backends.cudnn.version(),
            "driver_version": _run(["nvidia-smi", "--query-gpu=driver_version",
                                    "--format=csv,noheader", "-i", str(device.index or 0)]),
        })
    return info


def describe(env):
    """One line naming the machine and software of a results document."""
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    fb = env.get("fusedbn") or {}
    parts = [env["device_name"], "torch %s" % env["torch_version"],
             "fusedbn %s" % fb.get("version", "?"), "commit %s" % commit]
    if env["device"] == "cpu":
        parts.insert(1, "%s torch threads" % env["torch_threads"])
    else:
        parts.insert(1, "CUDA %s, driver %s" % (env.get("torch_cuda_version"),
                                                env.get("driver_version")))
    return ", ".join(parts)
