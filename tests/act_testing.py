"""Helpers of the fused batch norm + activation tests: the unfused torch sequence
act(nn.BatchNorm(x) + r) in the module's dtypes ("theirs") and in float64 ("ref"), and the
comparison of every result with bn_testing's rule.

Scales (bn_testing's rule is relative to the magnitude of the terms a result is made of):
  output          1.2 * (|x_hat w| + |b| + |r|)     (the activations are 1.2-Lipschitz at most)
  grad_residual   |dy| (1.2 + |z|)                  (f' of silu/gelu moves by <= 0.5 |dz|)
  grad_*          bn_testing.term_scales with dz's magnitude (and that bound) in place of dy
For float16/bfloat16 input with float32 parameters, dz = dy * act'(z) is rounded to the input
dtype before the reductions -- in torch's unfused backward as in ours -- so float32 grad_weight
and grad_bias may also carry u/2 times their scale (u = eps of the input dtype; not for identity
and relu, whose dz is exact).
Memory-saving mode recovers x_hat = (z - b - r) / w from the output rounded to the input dtype:
  |error of x_hat_i| <= d_i = (u_T |z_i| + u_acc (|z_i| + |b| + |r_i|) + u_T |w x_hat_i|) / |w|
(the output's rounding, the subtraction, the rounding of x_hat / invstd to the input dtype), and
its results may differ from the exact ones by
  grad_weight  sum |dz_i| d_i,   grad_input_i  |w invstd| (d_i |mean(dz x_hat)| + |x_hat_i| mean(|dz| d))
(train; eval: grad_input does not use x_hat). These are added to the allowed error; outputs,
grad_bias and grad_residual get nothing extra.
"""
import copy

import torch

import fusedbn
from fusedbn.act_modules import apply_activation
from bn_testing import (EPS32, LOW_PRECISION, TIGHT_TOL, Trio, _cpu64, assert_parity, check_buffers,
                        term_scales)

ACTS = ["identity", "relu", "leaky_relu", "silu", "gelu_tanh"]
ACT_BY_RANK = {2: fusedbn.FusedBatchNormAct1d, 3: fusedbn.FusedBatchNormAct1d,
               4: fusedbn.FusedBatchNormAct2d, 5: fusedbn.FusedBatchNormAct3d}
SLOPE = 0.2


def torch_act(z, act, slope=SLOPE):
    """torch's own activation (F.relu, F.leaky_relu, F.silu, F.gelu(approximate="tanh"))."""
    return apply_activation(z, act, slope)


class ActTrio:
    """FusedBatchNormAct (ours), nn.BatchNorm + add + act (theirs, same dtypes; None where torch
    has no kernel) and the float64 reference, from one random state (bn_testing.Trio)."""

    def __init__(self, rank, C, input_dtype, param_dtype, device, act, memory_saving=False,
                 **options):
        base = Trio(rank, C, input_dtype, param_dtype, device, **options)
        self.input_dtype, self.param_dtype = input_dtype, param_dtype
        self.act = act
        self.ours = ACT_BY_RANK[rank](C, device=device, dtype=param_dtype, activation=act,
                                      negative_slope=SLOPE, memory_saving=memory_saving,
                                      **options)
        self.ours.load_state_dict(base.fused.state_dict())
        self.theirs, self.ref = base.theirs, base.ref
        self.memory_saving = memory_saving

    def train(self, mode=True):
        for m in (self.ours, self.theirs, self.ref):
            if m is not None:
                m.train(mode)
        return self


def run(module, x, r, dy, act=None):
    """y and the gradients of <y, dy> w.r.t. (x, weight, bias, r); module is ours when act is
    None, else a plain batch norm followed by + r and act."""
    x = x.detach().requires_grad_(True)
    r = r.detach().requires_grad_(True) if r is not None else None
    if act is None:
        y = module(x, r)
    else:
        z = module(x)
        y = torch_act(z + r if r is not None else z, act)
    params = [p for p in (module.weight, module.bias) if p is not None]
    leaves = [x] + params + ([r] if r is not None else [])
    grads = list(torch.autograd.grad(y, leaves, dy))
    dx = grads.pop(0)
    dw = grads.pop(0) if module.weight is not None else None
    db = grads.pop(0) if module.bias is not None else None
    dr = grads.pop(0) if r is not None else None
    return y, dx, dw, db, dr


def _reference_terms(trio, x, r, dy):
    """float64 z, x_hat and dz of the reference, for the scales and the recovery bound."""
    m = trio.ref
    x64 = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    if m.training or m.running_mean is None:
        mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    else:
        mean, var = m.running_mean.detach().double(), m.running_var.detach().double()
    xhat = (x64 - mean.view(view)) * (var + m.eps).rsqrt().view(view)
    w = (m.weight.detach().double() if m.weight is not None
         else torch.ones_like(mean)).view(view)
    b = (m.bias.detach().double() if m.bias is not None else torch.zeros_like(mean)).view(view)
    z = (xhat * w + b + (r.detach().double() if r is not None else 0)).requires_grad_(True)
    dz, = torch.autograd.grad(torch_act(z, trio.act), z, dy.detach().double())
    return z.detach(), xhat, dz, w, b


def recovery_extra(trio, x, r, z, xhat, dz, w, b, train):
    """The extra error memory-saving mode may make (module docstring): grad_input, grad_weight."""
    u_t = torch.finfo(trio.input_dtype).eps
    u_acc = torch.finfo(torch.float64 if trio.input_dtype == torch.float64 else torch.float32).eps
    rr = r.detach().double().abs() if r is not None else 0
    d = (u_t * z.abs() + u_acc * (z.abs() + b.abs() + rr) + u_t * (w * xhat).abs()) / w.abs()
    dims = [0] + list(range(2, x.dim()))
    extra_dw = (dz.abs() * d).sum(dims)
    if not train:
        return torch.zeros_like(dz), extra_dw
    M = x.numel() // x.shape[1]
    invstd = (x.detach().double().var(dims, unbiased=False) + trio.ref.eps).rsqrt()
    k = ((dz * xhat).sum(dims, keepdim=True) / M).abs()
    md = (dz.abs() * d).sum(dims, keepdim=True) / M
    extra_dx = (w * invstd.view(w.shape)).abs() * (d * k + xhat.abs() * md)
    return extra_dx, extra_dw


def check_close(name, ours, theirs, ref, dtype, scale, extra=None):
    """bn_testing.assert_parity plus an allowed extra error (memory-saving recovery)."""
    if extra is None or not bool((extra > 0).any()):
        assert_parity(name, ours, theirs, ref, dtype, scale)
        return
    extra = _cpu64(extra).expand_as(_cpu64(ref))
    if dtype in TIGHT_TOL:
        rtol, _ = TIGHT_TOL[dtype]
        sc = torch.maximum(_cpu64(scale).expand_as(extra), _cpu64(ref).abs())
        assert_parity(name, ours, theirs, ref, dtype, sc + extra / rtol)
        return
    o, r = _cpu64(ours), _cpu64(ref)
    t = _cpu64(theirs) if theirs is not None else r.to(dtype).double()
    assert ours.dtype == dtype
    floor = (r.to(dtype).double() - r).abs().max() + EPS32 * r.abs().max()
    excess = ((o - r).abs() - (2 * (t - r).abs().max() + floor + extra)).reshape(-1)
    i = int(excess.argmax())
    assert excess[i] <= 0, (
        "%s (%s, memory-saving): |ours - ref| exceeds 2 * torch's error + floor + recovery bound "
        "by %.3g at flat index %d" % (name, dtype, excess[i], i))


def check_act_step(trio, x, r, dy, what=""):
    """One forward/backward of ours, theirs and the reference; compares output, grad_input,
    grad_weight, grad_bias, grad_residual and the running statistics, and on CUDA the same
    results of fusedbn's CPU path (a copy of the module taken before the step, on the same data)
    in torch's part of the rule. Returns ours (y, dx)."""
    cpu = copy.deepcopy(trio.ours).cpu() if x.is_cuda else None
    y, dx, dw, db, dr = run(trio.ours, x, r, dy)
    ry, rdx, rdw, rdb, rdr = run(trio.ref, x.double(), r.double() if r is not None else None,
                                 dy.double(), trio.act)
    if trio.theirs is not None:
        ty, tdx, tdw, tdb, tdr = run(trio.theirs, x, r, dy, trio.act)
    else:
        ty = tdx = tdw = tdb = tdr = None
    m = trio.ref
    train = m.training or m.running_mean is None
    z, xhat, dz, w, b = _reference_terms(trio, x, r, dy)
    dy64 = dy.detach().double()
    smooth = trio.act in ("silu", "gelu_tanh")
    dz_mag = dz.abs() + (0.5 * dy64.abs() * (z.abs() + 1) if smooth else 0)
    sc = term_scales(x, dz_mag, m.weight, m.bias, train, m.eps, m.running_mean, m.running_var)
    rr = r.detach().double().abs() if r is not None else 0
    idt, pdt = trio.input_dtype, trio.param_dtype
    extra_dx = extra_dw = extra_db = None
    if trio.memory_saving and fusedbn.act_ops.is_invertible(trio.act, SLOPE):
        extra_dx, extra_dw = recovery_extra(trio, x, r, z, xhat, dz, w, b, train)
    if idt in LOW_PRECISION and trio.act not in ("identity", "relu"):
        # dz = dy * act'(z) is rounded to the input dtype before the reductions, by torch's
        # unfused backward as by ours: float32 grad_weight / grad_bias carry that rounding.
        u = torch.finfo(idt).eps / 2
        extra_dw = u * sc["grad_weight"] + (extra_dw if extra_dw is not None else 0)
        extra_db = u * sc["grad_bias"]
    others = [("", (ty, tdx, tdw, tdb, tdr))]
    if cpu is not None:
        others.append(("cuda vs cpu ", run(cpu, x.cpu(), r.cpu() if r is not None else None,
                                           dy.cpu())))
    for label, (ty, tdx, tdw, tdb, tdr) in others:
        w_ = what + label
        check_close(w_ + "output", y, ty, ry, idt, 1.2 * (sc["output"] + rr))
        check_close(w_ + "grad_input", dx, tdx, rdx, idt, sc["grad_input"], extra_dx)
        if dw is not None:
            check_close(w_ + "grad_weight", dw, tdw, rdw, pdt, sc["grad_weight"], extra_dw)
        if db is not None:
            check_close(w_ + "grad_bias", db, tdb, rdb, pdt, sc["grad_bias"], extra_db)
        if dr is not None:
            check_close(w_ + "grad_residual", dr, tdr, rdr, idt, dy64.abs() * (1.2 + z.abs()))
    if cpu is not None and cpu.running_mean is not None:
        for name in ("running_mean", "running_var"):
            assert_parity(what + "cuda vs cpu " + name, getattr(trio.ours, name),
                          getattr(cpu, name), getattr(trio.ref, name), pdt)
    view = copy.copy(trio)  # check_buffers compares .fused with .theirs and .ref
    view.fused = trio.ours
    check_buffers(view, what)
    resync_running_stats(trio)
    return y, dx


def resync_running_stats(trio):
    """Each step's update is compared from the same starting point: the float64 reference would
    otherwise carry the previous steps' statistics unrounded, and a correctly rounded bfloat16
    update could then be one unit off it where torch's double rounding happens to land closer."""
    if trio.ours.running_mean is None:
        return
    with torch.no_grad():
        for m in (trio.theirs, trio.ref):
            if m is not None:
                m.running_mean.copy_(trio.ours.running_mean)
                m.running_var.copy_(trio.ours.running_var)
