"""What each provider computes and holds: the --check correctness gate and the memory footprint.

--check runs every provider once per case before timing and compares its outputs (y, the updated
running statistics, or dx/dweight/dbias) with a float64 reference computed by torch's eager
BatchNorm on the same inputs. The rule follows flash-attention's: the provider's error may be at
most K times the error of torch's own eager kernel in the case's dtype, plus a dtype floor. Errors
are max |out - ref| / max |ref| per output. A provider that fails is not timed, so a fast-but-wrong
kernel is never reported.
"""
import torch

from .cases import Inputs
from .providers import PROVIDERS, make_bench, make_module, run_outputs

K = 2.0
FLOOR = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}


def _as64(t):
    return t.detach().to(torch.float64)


def reference_outputs(case, inputs):
    """(float64 reference outputs, torch eager outputs in the case's dtype), by output name."""
    x64 = _as64(inputs.x).requires_grad_(True)
    inputs64 = Inputs(x=x64, dy=_as64(inputs.dy), weight=inputs.weight, bias=inputs.bias,
                      running_mean=inputs.running_mean, running_var=inputs.running_var)
    eager = PROVIDERS["torch"]
    module64 = make_module(False, inputs64, dtype=torch.float64)
    ref = run_outputs(make_bench(eager, case, inputs64, module=module64))
    base = run_outputs(make_bench(eager, case, inputs))
    return ref, base


def _error(out, ref):
    scale = ref.abs().max().item()
    return (_as64(out) - ref).abs().max().item() / max(scale, 1e-30)


def check_outputs(case, outputs, ref, base):
    """Compares a provider's outputs with the reference. Returns a dict: passed, and per output
    the error, torch's error and the bound."""
    result = {"passed": True, "outputs": {}}
    for name, r in ref.items():
        out = outputs.get(name)
        if out is None or tuple(out.shape) != tuple(r.shape):
            got = None if out is None else tuple(out.shape)
            result["outputs"][name] = {"error": "shape %s, expected %s" % (got, tuple(r.shape))}
            result["passed"] = False
            continue
        err, err_torch = _error(out, r), _error(base[name], r)
        bound = K * err_torch + FLOOR[case.dtype]
        ok = err <= bound  # False for NaN
        result["outputs"][name] = {"error": err, "torch_error": err_torch, "bound": bound,
                                   "passed": ok}
        result["passed"] = result["passed"] and ok
    return result


def describe_failure(check):
    """A one-line reason for a failed check."""
    bad = []
    for name, o in check["outputs"].items():
        if not o.get("passed", False):
            if "bound" in o:
                bad.append("%s error %.3g > bound %.3g" % (name, o["error"], o["bound"]))
            else:
                bad.append("%s %s" % (name, o["error"]))
    return "check failed: " + "; ".join(bad)


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the timed call, above what was allocated "
            "before it (for bwd: after the forward)",
    "cpu": "bytes of the forward's output plus the tensors it saves for backward (unique "
           "storages, inputs and parameters not counted); no allocator statistics exist on the "
           "CPU, so transient workspace is not seen",
}


def memory_bytes(bench, device, inputs):
    """The memory the bench needs (see MEMORY_METHOD); inputs are not counted."""
    with bench.provider.context():
        if device.type == "cuda":
            return _cuda_peak(bench, device)
        return _cpu_held(bench, inputs)


def _cuda_peak(bench, device):
    torch.cuda.synchronize(device)
    if bench.setup is not None:
        bench.setup()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = bench.fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _cpu_held(bench, inputs):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bench.forward()
    owned = [inputs.x, inputs.dy] + list(bench.module.parameters()) + list(bench.module.buffers())
    exclude = {t.untyped_storage().data_ptr() for t in owned}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [y] + saved}
    return sum(n for ptr, n in storages.items() if ptr not in exclude)
