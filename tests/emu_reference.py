"""Long-double references of the fusedbn ops and the comparison rule of the emulated CUDA tests.

The rule (issue 13): each output of an emulated CUDA op ("emu") is compared with an exact-as-we-can
reference computed in long double (numpy.longdouble, 64-bit mantissa on x86-64) and with the CPU op
on the same inputs ("cpu"):
    |emu - ref| <= 2 * max|cpu - ref| + 2 * eps(dtype) * max(1, |ref|)      elementwise,
eps(dtype) the machine epsilon of the output's dtype. Non-finite values must match the CPU op's
pattern (NaN where it has NaN, the same infinities); masks and integer outputs must be equal.
"""
import numpy as np
import torch

LD = np.longdouble


def ld(t):
    """A tensor as a long-double array (float64 first: exact for every float dtype)."""
    return t.detach().to(torch.float64).contiguous().numpy().astype(LD)


def ld_opt(t, C, default):
    return ld(t) if t is not None else np.full(C, default, dtype=LD)


def planes(x):
    """x (N, C, *) as a long-double (N, C, S) array."""
    a = ld(x)
    return a.reshape(x.shape[0], x.shape[1], -1)


def bcast(v):
    return v[None, :, None]


@np.errstate(invalid="ignore", over="ignore")
def fwd_train(x, w, b, eps):
    X = planes(x)
    C = X.shape[1]
    M = X.shape[0] * X.shape[2]
    mean = X.sum(axis=(0, 2)) / M
    var = ((X - bcast(mean)) ** 2).sum(axis=(0, 2)) / M
    invstd = 1 / np.sqrt(var + LD(eps))
    y = (X - bcast(mean)) * bcast(invstd * ld_opt(w, C, 1)) + bcast(ld_opt(b, C, 0))
    return y.reshape(x.shape), mean, invstd, var


def fwd_eval(x, w, b, rm, rv, eps):
    X = planes(x)
    C = X.shape[1]
    scale = ld_opt(w, C, 1) / np.sqrt(ld(rv) + LD(eps))
    y = (X - bcast(ld(rm))) * bcast(scale) + bcast(ld_opt(b, C, 0))
    return y.reshape(x.shape)


def bwd(dy, x, w, mean, invstd, train):
    DY, X = planes(dy), planes(x)
    C = X.shape[1]
    M = X.shape[0] * X.shape[2]
    m, s, W = ld(mean), ld(invstd), ld_opt(w, C, 1)
    xhat = (X - bcast(m)) * bcast(s)
    sum_dy = DY.sum(axis=(0, 2))
    sum_dy_xhat = (DY * xhat).sum(axis=(0, 2))
    if train and M > 0:
        dx = bcast(W * s) * (DY - bcast(sum_dy / M) - xhat * bcast(sum_dy_xhat / M))
    else:
        dx = DY * bcast(W * s)
    return dx.reshape(x.shape), sum_dy_xhat, sum_dy


@np.errstate(invalid="ignore", over="ignore")
def batch_stats(x):
    X = planes(x)
    M = X.shape[0] * X.shape[2]
    if M == 0:
        z = np.zeros(X.shape[1], dtype=LD)
        return z, z
    mean = X.sum(axis=(0, 2)) / M
    return mean, ((X - bcast(mean)) ** 2).sum(axis=(0, 2)) / M


def backward_reduce(dy, x, mean):
    DY, X = planes(dy), planes(x)
    return DY.sum(axis=(0, 2)), (DY * (X - bcast(ld(mean)))).sum(axis=(0, 2))


def backward_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, count):
    DY, X = planes(dy), planes(x)
    C = X.shape[1]
    s, W = ld(invstd), ld_opt(w, C, 1)
    dx = bcast(W * s) * (DY - bcast(ld(sum_dy) / count)
                         - (X - bcast(ld(mean))) * bcast(s * s * ld(sum_dy_xmu) / count))
    return dx.reshape(x.shape)


def running(rm, rv, mean, var, count, f):
    return ((1 - LD(f)) * ld(rm) + LD(f) * ld(mean),
            (1 - LD(f)) * ld(rv) + LD(f) * ld(var) * LD(count) / LD(count - 1))


# ---- activations (csrc/activation.h) ------------------------------------------------------------
K0, K1 = LD("0.7978845608028654"), LD("0.044715")


def act_f(z, act, slope):
    if act == 0:
        return z
    if act == 1:
        return np.where(z <= 0, LD(0), z)
    if act == 2:
        return np.where(z > 0, z, z * LD(slope))
    if act == 3:
        return z / (1 + np.exp(-z))
    return LD(0.5) * z * (1 + np.tanh(K0 * (z + K1 * z ** 3)))


def act_grad(z, g, act, slope):
    if act == 0:
        return g
    if act == 1:
        return np.where(z <= 0, LD(0), g)
    if act == 2:
        return np.where(z > 0, g, g * LD(slope))
    if act == 3:
        s = 1 / (1 + np.exp(-z))
        return g * s * (1 + z * (1 - s))
    t = np.tanh(K0 * (z + K1 * z ** 3))
    return g * (LD(0.5) * (1 + t) + LD(0.5) * z * (1 - t * t) * K0 * (1 + 3 * K1 * z * z))


def act_z(x, w, b, r, mean, invstd):
    """z = BN(x) + r with the given (long double) statistics."""
    X = planes(x)
    C = X.shape[1]
    z = (X - bcast(mean)) * bcast(invstd * ld_opt(w, C, 1)) + bcast(ld_opt(b, C, 0))
    z = z.reshape(x.shape)
    if r is not None:
        z = z + ld(r)
    return z


# ---- the comparison rule ------------------------------------------------------------------------

def _bits(t):
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def assert_bitwise_equal(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(_bits(a), _bits(b)), "%s: not bit-for-bit equal" % what


def assert_rule(name, emu, cpu, ref):
    """emu and cpu: tensors of the same dtype and shape; ref: long-double array (or tensor)."""
    assert emu.shape == cpu.shape, "%s: shape %s, the CPU op's %s" % (name, emu.shape, cpu.shape)
    assert emu.dtype == cpu.dtype, "%s: dtype %s, the CPU op's %s" % (name, emu.dtype, cpu.dtype)
    if not emu.dtype.is_floating_point:
        assert torch.equal(emu, cpu), "%s: differs from the CPU op (exact output)" % name
        return
    e = emu.detach().to(torch.float64)
    c = cpu.detach().to(torch.float64)
    r = torch.from_numpy(np.asarray(ref, dtype=LD).astype(np.float64)).reshape(emu.shape)
    nan_e, nan_c = torch.isnan(e), torch.isnan(c)
    assert torch.equal(nan_e, nan_c), "%s: NaN at %d places, the CPU op at %d (%s)" % (
        name, int(nan_e.sum()), int(nan_c.sum()),
        "first difference at %s" % (tuple((nan_e != nan_c).nonzero()[0].tolist()),))
    inf_e, inf_c = torch.isinf(e), torch.isinf(c)
    assert torch.equal(inf_e, inf_c) and torch.equal(e[inf_e], c[inf_c]), (
        "%s: infinities differ from the CPU op's" % name)
    fin = torch.isfinite(e) & torch.isfinite(r)
    if not fin.any():
        return
    err_e = (e - r).abs()[fin]
    err_c = (c - r).abs()[fin & torch.isfinite(c)]
    eps = torch.finfo(emu.dtype).eps
    bound = 2 * (err_c.max() if err_c.numel() else 0.0) + 2 * eps * r[fin].abs().clamp(min=1)
    bad = err_e > bound
    if bad.any():
        i = int(((err_e - bound) / bound).argmax())
        raise AssertionError(
            "%s: error %.3g against the long-double reference %.17g exceeds the bound %.3g "
            "(2 x the CPU op's max error %.3g + 2 eps max(1, |ref|)); %d of %d elements over" % (
                name, float(err_e[i]), float(r[fin][i]), float(bound[i]),
                float(err_c.max()) if err_c.numel() else 0.0, int(bad.sum()), int(fin.sum())))
