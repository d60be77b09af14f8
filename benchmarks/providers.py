"""Who is measured: the providers, and the callables that run one mode of one case.

Providers:
  fusedbn       fusedbn.FusedBatchNorm{1,2,3}d (eager)
  torch         nn.BatchNorm{1,2,3}d eager with torch's default backend choice (on the CPU: torch's
                own CPU kernel)
  cudnn         nn.BatchNorm eager with torch.backends.cudnn.enabled = True (CUDA only; torch picks
                cuDNN for float32 and half with float parameters, its native kernels for bfloat16)
  torch_native  nn.BatchNorm eager with cuDNN disabled: torch's native CUDA kernels (CUDA only)
  compile       torch.compile(nn.BatchNorm, dynamic=False): Inductor's generated kernels
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Provider:
    """How to build the module of a provider and under which backend settings to run it."""

    name: str
    fused: bool = False          # the module comes from fusedbn
    compiled: bool = False       # wrapped in torch.compile
    cudnn: Optional[bool] = None  # torch.backends.cudnn.enabled while running; None: unchanged
    devices: tuple = ("cpu", "cuda")

    def context(self):
        """The backend settings the provider runs under (wraps forward and backward alike)."""
        if self.cudnn is None:
            return contextlib.nullcontext()
        return _cudnn_enabled(self.cudnn)


PROVIDERS = {p.name: p for p in (
    Provider("fusedbn", fused=True),
    Provider("torch"),
    Provider("cudnn", cudnn=True, devices=("cuda",)),
    Provider("torch_native", cudnn=False, devices=("cuda",)),
    Provider("compile", compiled=True),
)}
REFERENCE = "fusedbn"  # speed-ups are reported as t(other) / t(fusedbn)


def default_providers(device_type):
    """The providers run when --providers is not given."""
    if device_type == "cuda":
        return ["fusedbn", "cudnn", "torch_native", "compile"]
    return ["fusedbn", "torch", "compile"]


def resolve_providers(names, device_type):
    """Checks the provider names against the device; returns Provider objects."""
    out = []
    for name in names:
        if name not in PROVIDERS:
            raise ValueError("unknown provider %r (known: %s)" % (name, ", ".join(PROVIDERS)))
        if device_type not in PROVIDERS[name].devices:
            raise ValueError("provider %r needs one of %s, not %s"
                             % (name, PROVIDERS[name].devices, device_type))
        out.append(PROVIDERS[name])
    return out


@contextlib.contextmanager
def _cudnn_enabled(flag):
    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = flag
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = old


def configure_compile():
    """Lets torch.compile keep one graph per (shape, dtype, layout, train/eval) without silently
    falling back to eager when dynamo's recompile limit is reached: raise the limit, and make
    reaching it an error (recorded per case) where the option exists."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 65536),
                        ("accumulated_cache_size_limit", 65536),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def module_class(ndim, fused):
    """nn.BatchNorm{1,2,3}d or fusedbn.FusedBatchNorm{1,2,3}d for an input of ndim dimensions."""
    d = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    if fused:
        import fusedbn  # imported here: --report and the other providers work without it
        return getattr(fusedbn, "FusedBatchNorm%dd" % d)
    return getattr(nn, "BatchNorm%dd" % d)


def make_module(fused, inputs, dtype=torch.float32):
    """A batch-norm module holding the case's initial parameters and running statistics."""
    x = inputs.x
    m = module_class(x.dim(), fused)(x.shape[1], device=x.device, dtype=dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(m, name).copy_(getattr(inputs, name))
    return m


@dataclass
class Bench:
    """The callables of one (provider, case).

    fn:      the timed call; returns the mode's outputs (see output_names)
    setup:   run before each timed call, outside the timed region (the forward, for bwd), or None
    forward: one forward as the mode runs it (used to account memory on the CPU)
    """

    provider: Provider
    module: nn.Module
    fn: Callable
    setup: Optional[Callable]
    forward: Callable
    output_names: tuple


def make_bench(provider, case, inputs, module=None):
    """The Bench that runs case.mode with the provider's module on the shared inputs. A module may
    be given (the float64 reference of --check); it is wrapped by torch.compile if the provider
    compiles."""
    module = module if module is not None else make_module(provider.fused, inputs)
    call = torch.compile(module, dynamic=False) if provider.compiled else module
    x, dy = inputs.x, inputs.dy
    wrt = (x, module.weight, module.bias)
    grads = ("dx", "dweight", "dbias")
    if case.mode == "infer":
        module.eval()

        def forward():
            with torch.no_grad():
                return call(x)
        return Bench(provider, module, forward, None, forward, ("y",))

    module.train()

    def forward():
        return call(x)

    if case.mode == "fwd":
        def fwd():
            y = call(x)
            return y, module.running_mean, module.running_var
        return Bench(provider, module, fwd, None, forward, ("y", "running_mean", "running_var"))
    if case.mode == "fwdbwd":
        def fwdbwd():
            return torch.autograd.grad(call(x), wrt, dy)
        return Bench(provider, module, fwdbwd, None, forward, grads)
    if case.mode == "bwd":
        pending = []

        def setup():
            pending.append(call(x))

        def bwd():
            return torch.autograd.grad(pending.pop(), wrt, dy)
        return Bench(provider, module, bwd, setup, forward, grads)
    raise ValueError("unknown mode %r" % case.mode)


def run_outputs(bench):
    """Runs the bench once (setup included) under its provider's settings; returns its outputs by
    name."""
    with bench.provider.context():
        if bench.setup is not None:
            bench.setup()
        out = bench.fn()
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(bench.output_names, out))
