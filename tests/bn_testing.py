"""Helpers shared by the test files: inputs in every layout, module trios (fusedbn, torch, float64
reference) from one random initial state, and the comparison rule.

The comparison rule
-------------------
Every result of fusedbn is compared with a float64 reference computed by torch itself (the
`nn.BatchNorm*` module or `F.batch_norm` in float64 on the upcast input and parameters), and with
torch's own result for the same dtypes ("theirs"). Let err_ours = |ours - ref| and
err_theirs = |theirs - ref|.

* float32 / float64 results: elementwise
      err_ours <= atol + rtol * scale + max(err_theirs)
  with (rtol, atol) = (1e-5, 1e-5) for float32 and (1e-10, 1e-10) for float64, where `scale` is
  the magnitude of the terms the result is computed from (the classical forward error bound of a
  sum is proportional to the sum of the absolute values of its terms, not to the result):
      output      |x_hat * w| + |b|
      grad_input  |w * invstd| * (|dy| + |mean(dy)| + |x_hat| * |mean(dy * x_hat)|)   (train)
      grad_weight sum |dy * x_hat|    grad_bias sum |dy|    (over the M values of a channel)
  and |ref| for the rest. A float32 reduction computed in blocks is within ~10 eps * sum|terms| of
  the exact value (measured: fusedbn and torch both reach ~12 eps on 715-value channels-last
  channels); rtol = 1e-5 (~84 eps) leaves a margin for that and is still far below a real bug: a
  term dropped or counted twice moves the result by |term|, i.e. by sum|terms| / M, which is more
  than 1e-5 * sum|terms| for every M < 1e5. For grad_weight with cancellation (sum|dy * x_hat| ~
  15x |grad_weight|) a tolerance relative to |ref| would demand more than float32 can give. The
  max(err_theirs) term only matters where torch itself is less accurate (its channels-last CPU
  kernel sums in plain float32 and is off by ~1e-4 on 256x256 planes): we never demand more
  accuracy than torch achieves.
* float16 / bfloat16 results (the flash-attention rule): per tensor
      max(err_ours) <= 2 * max(err_theirs) + floor,
      floor = max|round_dtype(ref) - ref| + eps_float32 * max|ref|
  i.e. at most twice torch's own error, plus one rounding of the exact result to the output dtype
  (the error even a perfect kernel makes) and one float32 rounding (the accumulation precision),
  so that the rule stays meaningful where torch happens to be exact.
* Where torch cannot compute a combination at all (float64 input with float32 weight), "theirs"
  is the reference rounded to the result's dtype: the best any implementation could return.

Non-finite values are compared by pattern first: NaN exactly where the reference has NaN, the
same infinities; the finite values then follow the rule above.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
TIGHT_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
EPS32 = torch.finfo(torch.float32).eps

# (input dtype, parameter dtype) pairs fusedbn supports: the input's dtype or float32.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def dtype_pair_id(pair):
    names = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
             torch.bfloat16: "bf16"}
    return "%s-params_%s" % (names[pair[0]], names[pair[1]])


def torch_supports(input_dtype, param_dtype):
    """torch's CPU batch norm takes float32 parameters only with float16/bfloat16 input."""
    return param_dtype == input_dtype or input_dtype in LOW_PRECISION


NN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
FUSED_BY_RANK = {2: fusedbn.FusedBatchNorm1d, 3: fusedbn.FusedBatchNorm1d,
                 4: fusedbn.FusedBatchNorm2d, 5: fusedbn.FusedBatchNorm3d}

# ---------------------------------------------------------------------------------------------
# Inputs in every layout
# ---------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "channels_last", "sliced_channels", "sliced_last", "permuted")


def layout_applies(layout, ndim):
    if layout == "channels_last":  # (N, C) has no separate channels-last layout
        return ndim >= 3
    if layout == "sliced_last":  # for (N, C) the last dim is C: same as sliced_channels
        return ndim >= 3
    return True


def random_values(shape, *, scale=1.0):
    """float64 values with a different mean and spread per channel (so that a kernel mixing up
    channels cannot pass), generated on the CPU from the global (per-test) seed."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    spread = (0.5 + torch.rand(C, dtype=torch.float64)).view(view)
    offset = torch.randn(C, dtype=torch.float64).view(view)
    return (torch.randn(shape, dtype=torch.float64) * spread + offset) * scale


def in_layout(values, dtype, layout, device):
    """A tensor equal to `values` (cast to dtype) whose strides follow `layout`:
    contiguous; channels_last (dense, C fastest: torch's channels_last(_3d) for 4D/5D, a transposed
    (N, L, C) buffer for 3D); sliced_channels (every other channel of a 2C-channel buffer);
    sliced_last (every other element of the last dim); permuted (a buffer with the dimensions in
    reverse order, so that no dimension has stride 1 where the usual layouts have it).
    The elements a view skips are NaN, so that a kernel reading them shows it."""
    shape = tuple(values.shape)
    nd = len(shape)
    vals = values.to(dtype)
    if layout == "contiguous":
        x = torch.empty(shape, dtype=dtype, device=device)
    elif layout == "channels_last":
        assert nd >= 3
        if nd == 4:
            x = torch.empty(shape, dtype=dtype, device=device).to(
                memory_format=torch.channels_last)
        elif nd == 5:
            x = torch.empty(shape, dtype=dtype, device=device).to(
                memory_format=torch.channels_last_3d)
        else:
            x = torch.empty((shape[0], shape[2], shape[1]), dtype=dtype,
                            device=device).transpose(1, 2)
    elif layout == "sliced_channels":
        big = (shape[0], 2 * shape[1]) + shape[2:]
        x = torch.full(big, float("nan"), dtype=dtype, device=device)[:, ::2]
    elif layout == "sliced_last":
        big = shape[:-1] + (2 * shape[-1],)
        x = torch.full(big, float("nan"), dtype=dtype, device=device)[..., ::2]
    elif layout == "permuted":
        x = torch.empty(shape[::-1], dtype=dtype, device=device).permute(
            *reversed(range(nd)))
    else:
        raise ValueError(layout)
    assert x.shape == shape
    x.copy_(vals)
    if layout in ("sliced_channels", "sliced_last", "permuted") and x.numel() > 1:
        assert not x.is_contiguous()
    return x


def is_channels_last(t):
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _cpu64(t):
    return t.detach().to(device="cpu", dtype=torch.float64)


def assert_parity(name, ours, theirs, ref, expected_dtype=None, scale=None):
    """See the module docstring. `theirs` may be None (torch cannot compute this combination);
    then `expected_dtype` gives the dtype ours must have. `scale`: the magnitude of the terms
    the result is made of (default |ref|)."""
    if expected_dtype is None:
        expected_dtype = theirs.dtype
    assert ours.dtype == expected_dtype, "%s: dtype %s, expected %s" % (
        name, ours.dtype, expected_dtype)
    assert ours.shape == ref.shape, "%s: shape %s, expected %s" % (name, ours.shape, ref.shape)
    if theirs is not None:
        assert theirs.shape == ref.shape
    o, r = _cpu64(ours), _cpu64(ref)
    t = _cpu64(theirs) if theirs is not None else r.to(expected_dtype).double()
    sc = r.abs() if scale is None else torch.maximum(_cpu64(scale).expand_as(r), r.abs())
    if o.numel() == 0:
        return
    # Non-finite pattern first.
    assert torch.equal(torch.isnan(o), torch.isnan(r)), (
        "%s: NaN at %d places, reference at %d" % (name, torch.isnan(o).sum(),
                                                   torch.isnan(r).sum()))
    r_inf = torch.isinf(r)
    assert torch.equal(torch.isinf(o), r_inf) and torch.equal(o[r_inf], r[r_inf]), (
        "%s: infinities differ from the reference" % name)
    finite = torch.isfinite(r) & torch.isfinite(t) & torch.isfinite(sc)
    o, r, t, sc = o[finite], r[finite], t[finite], sc[finite]
    if o.numel() == 0:
        return
    err_o = (o - r).abs()
    err_t = (t - r).abs()
    if expected_dtype in TIGHT_TOL:
        rtol, atol = TIGHT_TOL[expected_dtype]
        allowed = atol + rtol * sc + err_t.max()
        excess = err_o - allowed
        i = int(excess.argmax())
        assert excess[i] <= 0, (
            "%s: |ours - ref| = %.3g at flat index %d (ours %.9g, ref %.9g, torch %.9g), allowed "
            "%.3g (rtol %g x scale %.3g + atol %g + torch's max error %.3g); %d of %d elements "
            "out of tolerance"
            % (name, err_o[i], i, o[i], r[i], t[i], allowed[i], rtol, sc[i], atol, err_t.max(),
               int((excess > 0).sum()), excess.numel()))
    else:
        floor = (r.to(expected_dtype).double() - r).abs().max() + EPS32 * r.abs().max()
        bound = 2 * err_t.max() + floor
        i = int(err_o.argmax())
        assert err_o[i] <= bound, (
            "%s (%s): max|ours - ref| = %.4g at flat index %d (ours %.6g, ref %.6g), allowed "
            "2 * torch's %.4g + floor %.3g = %.4g"
            % (name, expected_dtype, err_o[i], i, o[i], r[i], err_t.max(), floor, bound))


def term_scales(x, dy, weight, bias, train, eps, running_mean=None, running_var=None):
    """The magnitudes of the terms behind each result (see the module docstring), computed in
    float64 from the (upcast) input: dict output / grad_input / grad_weight / grad_bias."""
    x, dy = x.detach().double(), dy.detach().double()
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    view = (1, C) + (1,) * (x.dim() - 2)
    if train:
        mean = x.mean(dims)
        invstd = (x.var(dims, unbiased=False) + eps).rsqrt()
    else:
        mean = running_mean.detach().double()
        invstd = (running_var.detach().double() + eps).rsqrt()
    w = weight.detach().double() if weight is not None else torch.ones_like(mean)
    b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    x_hat = (x - mean.view(view)) * invstd.view(view)
    a = (w * invstd).abs().view(view)
    out = {"output": (x_hat * w.view(view)).abs() + b.abs().view(view),
           "grad_weight": (dy * x_hat).abs().sum(dims),
           "grad_bias": dy.abs().sum(dims)}
    if train and x.numel() > 0:
        M = x.numel() // C
        k = (dy * x_hat).sum(dims).abs().view(view) / M
        out["grad_input"] = a * (dy.abs() + dy.sum(dims).abs().view(view) / M + x_hat.abs() * k)
    else:
        out["grad_input"] = a * dy.abs()
    return out


# ---------------------------------------------------------------------------------------------
# Module trios: fusedbn, torch (same dtypes), float64 reference, from one random state
# ---------------------------------------------------------------------------------------------
def randomize_(module, *, num_batches_tracked=None):
    """Random weight/bias/running statistics so that nothing is accidentally 0 or 1."""
    C = module.num_features
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1.0 + 0.5 * torch.randn(C, dtype=torch.float64))
        if module.bias is not None:
            module.bias.copy_(torch.randn(C, dtype=torch.float64))
        if module.running_mean is not None:
            module.running_mean.copy_(0.5 * torch.randn(C, dtype=torch.float64))
            module.running_var.copy_(0.5 + torch.rand(C, dtype=torch.float64))
            if num_batches_tracked is not None:
                module.num_batches_tracked.fill_(num_batches_tracked)
    return module


class Trio:
    """fusedbn module, torch module with the same dtypes (None where torch has no kernel for the
    combination) and a float64 torch module, all with the same initial state."""

    def __init__(self, rank, C, input_dtype, param_dtype, device, num_batches_tracked=None,
                 **options):
        self.input_dtype = input_dtype
        self.param_dtype = param_dtype
        base = NN_BY_RANK[rank](C, device=device, dtype=param_dtype, **options)
        randomize_(base, num_batches_tracked=num_batches_tracked)
        self.fused = FUSED_BY_RANK[rank](C, device=device, dtype=param_dtype, **options)
        self.fused.load_state_dict(base.state_dict())
        self.theirs = base if torch_supports(input_dtype, param_dtype) else None
        self.ref = copy.deepcopy(base).double()

    def modules(self):
        return [m for m in (self.fused, self.theirs, self.ref) if m is not None]

    def train(self, mode=True):
        for m in self.modules():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)


def forward_backward(module, x, dy):
    """y and the gradients of <y, dy> with respect to (input, weight, bias) (None where absent),
    taken with autograd.grad so that the layout of grad_input is the backward's own."""
    x = x.detach().requires_grad_(True)
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = list(torch.autograd.grad(y, [x] + params, dy))
    dx = grads.pop(0)
    dw = grads.pop(0) if module.weight is not None else None
    db = grads.pop(0) if module.bias is not None else None
    return y, dx, dw, db


def check_trio_step(trio, x, dy, what=""):
    """One forward/backward of the three modules on x (ours and torch's in x's dtype and layout,
    the reference on the float64 upcast); compares outputs, gradients and running statistics,
    and on CUDA also with fusedbn's CPU path on the same state and data (check_against_cpu).
    Returns fusedbn's (y, dx) for format checks."""
    cpu = copy.deepcopy(trio.fused).cpu() if x.is_cuda else None
    y, dx, dw, db = forward_backward(trio.fused, x, dy)
    ry, rdx, rdw, rdb = forward_backward(trio.ref, x.double(), dy.double())
    if trio.theirs is not None:
        ty, tdx, tdw, tdb = forward_backward(trio.theirs, x, dy)
    else:
        ty = tdx = tdw = tdb = None
    idt, pdt = trio.input_dtype, trio.param_dtype
    m = trio.ref
    sc = term_scales(x, dy, m.weight, m.bias, m.training or m.running_mean is None, m.eps,
                     m.running_mean, m.running_var)
    assert_parity(what + "output", y, ty, ry, idt, sc["output"])
    assert_parity(what + "grad_input", dx, tdx, rdx, idt, sc["grad_input"])
    if dw is not None:
        assert_parity(what + "grad_weight", dw, tdw, rdw, pdt, sc["grad_weight"])
    if db is not None:
        assert_parity(what + "grad_bias", db, tdb, rdb, pdt, sc["grad_bias"])
    check_buffers(trio, what)
    if cpu is not None:
        names = ("output", "grad_input", "grad_weight", "grad_bias")
        check_against_cpu(cpu, trio, x, dy, dict(zip(names, (y, dx, dw, db))),
                          dict(zip(names, (ry, rdx, rdw, rdb))), sc, what)
    return y, dx


def check_against_cpu(cpu, trio, x, dy, ours, ref, scales, what=""):
    """CUDA results against fusedbn's CPU path (`cpu`: a CPU copy of the module taken before the
    step): the CPU result plays torch's part in the rule, so CUDA may be as far from the float64
    reference as the CPU path is, plus the float32 tolerance."""
    got = dict(zip(("output", "grad_input", "grad_weight", "grad_bias"),
                   forward_backward(cpu, x.cpu(), dy.cpu())))
    for name, t in ours.items():
        if t is not None:
            dt = trio.input_dtype if name in ("output", "grad_input") else trio.param_dtype
            assert_parity(what + "cuda vs cpu " + name, t, got[name], ref[name], dt,
                          scales[name])
    if cpu.running_mean is not None:
        for name in ("running_mean", "running_var"):
            assert_parity(what + "cuda vs cpu " + name, getattr(trio.fused, name),
                          getattr(cpu, name), getattr(trio.ref, name), trio.param_dtype)


def check_buffers(trio, what=""):
    f, t, r = trio.fused, trio.theirs, trio.ref
    if r.running_mean is None:
        assert f.running_mean is None and f.running_var is None
        assert f.num_batches_tracked is None
        return
    assert_parity(what + "running_mean", f.running_mean,
                  t.running_mean if t is not None else None, r.running_mean, trio.param_dtype)
    assert_parity(what + "running_var", f.running_var,
                  t.running_var if t is not None else None, r.running_var, trio.param_dtype)
    assert f.num_batches_tracked.dtype == torch.long
    assert int(f.num_batches_tracked) == int(r.num_batches_tracked), (
        "%snum_batches_tracked %d, torch %d" % (what, int(f.num_batches_tracked),
                                               int(r.num_batches_tracked)))


# ---------------------------------------------------------------------------------------------
# Functional trios
# ---------------------------------------------------------------------------------------------
def functional_call(fn, x, dy, weight, bias, running_mean, running_var, training, momentum, eps):
    """fn(...) and the gradients of <y, dy> w.r.t. (x, weight, bias); the tensors are used as
    given (running statistics are mutated in place by fn)."""
    x = x.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True) if weight is not None else None
    b = bias.detach().requires_grad_(True) if bias is not None else None
    y = fn(x, running_mean, running_var, w, b, training, momentum, eps)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = list(torch.autograd.grad(y, leaves, dy))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    return y, dx, dw, db


def clone_or_none(t, dtype=None):
    if t is None:
        return None
    return t.detach().clone() if dtype is None else t.detach().to(dtype).clone()


FUSED_F = fusedbn.functional.batch_norm
TORCH_F = F.batch_norm
