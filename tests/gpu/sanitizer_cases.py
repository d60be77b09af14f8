"""One small call of every CUDA op and kernel path of fusedbn, for compute-sanitizer (memcheck,
racecheck, initcheck) and as a quick CUDA smoke test; each result is compared with fusedbn's CPU
path on the same data.

    python tests/gpu/sanitizer_cases.py --device cuda            # all cases, CUDA vs CPU
    python tests/gpu/sanitizer_cases.py --device cuda --large    # + the 64-bit index cases
    python tests/gpu/sanitizer_cases.py --list
    compute-sanitizer --tool racecheck python tests/gpu/sanitizer_cases.py --device cuda

Every op registered for CUDA (csrc/cuda/register.cu, bn_act_register.cu) is called by at least
one case (tests/gpu/test_sanitizer_cases.py checks that). The kernel paths, by case name prefix:

  planes_*   reduce_planes_kernel (contiguous, large planes: vectors, element-wise tails at either
             end, a misaligned base address) + merge_partials_kernel + the contiguous element-wise
             kernels (affine map; grad_input)
  packed_*   reduce_packed_kernel (small planes: vectorized when C*S is a multiple of the vector
             width, scalar otherwise)
  rows_*     reduce_rows_kernel (channels_last, channels_last_3d, (N, C); vectorized when C is a
             multiple of the vector width) + the channels-last element-wise kernels
  eval_*     eval_coeffs_kernel (forward_eval), eval_dx_coeffs_kernel (backward, train=False)
  running_*  update_running_stats_kernel (momentum, and None: 1 / num_batches_tracked on device)
  sync_*     batch_stats, backward_reduce, backward_elemt (elemt_coeffs_kernel)
  act_*      the BN + residual + activation element-wise kernels (bn_act_ew.cuh), every
             activation, sign mask saved and used, memory-saving recovery from the output
  empty_*    empty batches (early returns)
  large_*    (--large only) more than 2^30 elements: the 64-bit index instantiations
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fusedbn  # noqa: E402,F401  (loads the operator library)

ops = torch.ops.fusedbn
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# max|cuda - cpu| / max|cpu| accepted per dtype: the two paths sum in different orders.
TOL = {F32: 1e-4, F64: 1e-10, F16: 1e-2, BF16: 4e-2}
ALL = [True, True, True]


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def values(shape, seed):
    """float64 values on the CPU with a per-channel offset and spread (never all zeros)."""
    g = _gen(seed)
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    spread = (0.5 + torch.rand(C, generator=g, dtype=F64)).view(view)
    offset = torch.randn(C, generator=g, dtype=F64).view(view)
    return torch.randn(shape, generator=g, dtype=F64) * spread + offset


def tensor(shape, dtype, layout, device, seed):
    """values(shape, seed) as dtype on device in a layout: contiguous, channels_last (4-D/5-D),
    or misaligned (contiguous, but the data starts one element into its allocation)."""
    v = values(shape, seed).to(dtype)
    if layout == "contiguous":
        return v.to(device)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return v.to(device).contiguous(memory_format=fmt)
    if layout == "misaligned":
        buf = torch.empty(v.numel() + 1, dtype=dtype, device=device)
        x = buf[1:].view(shape)
        x.copy_(v)
        return x
    raise ValueError(layout)


def hashed_tensor(shape, dtype, layout, device, seed, chunk=1 << 26):
    """Like tensor(), for inputs too large to draw in float64 on the CPU: element i (in logical
    order) is a hash of i and the seed, scaled and offset per channel, made in chunks with the
    same integer and float32 arithmetic on either device, so the CPU and CUDA inputs agree and
    a read from a wrong (overflowed) index shows."""
    n = 1
    for d in shape:
        n *= d
    C, S = shape[1], n // (shape[0] * shape[1])
    flat = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=device, dtype=torch.int64)
        h = (idx * 2654435761 + seed * 40503) % 4294967296
        c = ((idx // S) % C).to(torch.float32)
        u = h.to(torch.float32) * (1.0 / 4294967296) - 0.5
        flat[start:start + idx.numel()] = (u * (3.0 + 0.75 * c) + 0.5 * c).to(dtype)
        del idx, h, c, u
    x = flat.view(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def channel(C, device, dtype, kind, seed):
    g = _gen(seed)
    v = {"weight": 1 + 0.5 * torch.randn(C, generator=g, dtype=F64),
         "bias": torch.randn(C, generator=g, dtype=F64),
         "mean": 0.5 * torch.randn(C, generator=g, dtype=F64),
         "var": 0.5 + torch.rand(C, generator=g, dtype=F64)}[kind]
    return v.to(device=device, dtype=dtype)


def param_dtype(dtype):
    return F64 if dtype == F64 else F32


# ---- case builders: each returns fn(device) -> {name: tensor} ---------------------------------
def train_case(shape, dtype, layout, affine=True, pdt=None, mask=ALL, make=tensor):
    """forward_train + backward(train=True): the reduction, its merge, both element-wise maps."""
    def fn(dev):
        x = make(shape, dtype, layout, dev, 1)
        dy = make(shape, dtype, layout, dev, 2)
        p = pdt or param_dtype(dtype)
        w = channel(shape[1], dev, p, "weight", 3) if affine else None
        b = channel(shape[1], dev, p, "bias", 4) if affine else None
        y, mean, invstd, var = ops.forward_train(x, w, b, 1e-5)
        dx, dw, db = ops.backward(dy, x, w, mean, invstd, True, mask)
        return {"y": y, "mean": mean, "invstd": invstd, "var": var, "dx": dx, "dw": dw, "db": db}
    return fn


def eval_case(shape, dtype, layout, affine=True):
    """forward_eval + backward(train=False) with running statistics."""
    def fn(dev):
        x = tensor(shape, dtype, layout, dev, 1)
        dy = tensor(shape, dtype, layout, dev, 2)
        p = param_dtype(dtype)
        w = channel(shape[1], dev, p, "weight", 3) if affine else None
        b = channel(shape[1], dev, p, "bias", 4) if affine else None
        rm, rv = channel(shape[1], dev, p, "mean", 5), channel(shape[1], dev, p, "var", 6)
        y = ops.forward_eval(x, w, b, rm, rv, 1e-5)
        invstd = (rv.to(param_dtype(dtype)) + 1e-5).rsqrt()
        dx, dw, db = ops.backward(dy, x, w, rm.to(param_dtype(dtype)), invstd, False, ALL)
        return {"y": y, "dx": dx, "dw": dw, "db": db}
    return fn


def running_case(running_dtype, momentum):
    def fn(dev):
        C = 37
        stat = F64 if running_dtype == F64 else F32
        rm, rv = channel(C, dev, running_dtype, "mean", 1), channel(C, dev, running_dtype, "var", 2)
        mean, var = channel(C, dev, stat, "mean", 3), channel(C, dev, stat, "var", 4)
        nbt = torch.tensor(5, device=dev) if momentum is None else None
        ops.update_running_stats(rm, rv, mean, var, 100, momentum, nbt)
        return {"running_mean": rm, "running_var": rv}
    return fn


def sync_case(shape, dtype, layout):
    def fn(dev):
        x = tensor(shape, dtype, layout, dev, 1)
        dy = tensor(shape, dtype, layout, dev, 2)
        w = channel(shape[1], dev, param_dtype(dtype), "weight", 3)
        mean, var = ops.batch_stats(x)
        invstd = (var + 1e-5).rsqrt()
        sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
        M = x.numel() // x.shape[1]
        dx = ops.backward_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, 3 * M)
        # The statistics in float32 for float32 input (the CPU's are float64: its accumulation
        # type, csrc/schema.cpp), so that CUDA's compare with the CPU's as they round them.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return {"mean": mean.to(acc), "var": var.to(acc), "sum_dy": sum_dy.to(acc),
                "sum_dy_xmu": sum_dy_xmu.to(acc), "dx": dx}
    return fn


ACT_IDS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu_tanh": 4}


def act_case(shape, dtype, layout, act, residual=True, train=True, source=None, slope=0.1,
             make=tensor):
    """act_forward_train/eval + act_backward. source: 0 recompute from x, 1 x and the saved sign
    mask, 2 memory-saving recovery from y (default: 1 for relu/leaky_relu, else 0)."""
    a = ACT_IDS[act]
    if source is None:
        source = 1 if act in ("relu", "leaky_relu") else 0
    save_mask = source == 1

    def fn(dev):
        x = make(shape, dtype, layout, dev, 1)
        dy = make(shape, dtype, layout, dev, 2)
        r = make(shape, dtype, layout, dev, 7) if residual else None
        p = param_dtype(dtype)
        w = channel(shape[1], dev, p, "weight", 3)
        b = channel(shape[1], dev, p, "bias", 4)
        if train:
            y, mean, invstd, var, mask = ops.act_forward_train(x, w, b, r, 1e-5, a, slope,
                                                               save_mask)
        else:
            rm, rv = channel(shape[1], dev, p, "mean", 5), channel(shape[1], dev, p, "var", 6)
            y, mask = ops.act_forward_eval(x, w, b, rm, rv, r, 1e-5, a, slope, save_mask)
            mean, invstd = rm, (rv + 1e-5).rsqrt()
        saved = y if source == 2 else x
        out = ops.act_backward(dy, saved, r, mask if save_mask else None, w, b, mean, invstd,
                               train, a, slope, source, [True, True, True, residual])
        res = {"y": y, "dx": out[0], "dw": out[1], "db": out[2]}
        if residual:
            res["dr"] = out[3]
        return res
    return fn


def module_case(cls_name, shape, dtype, layout, momentum=0.1):
    """A module's eager path (csrc/eager.cpp): two training steps and an eval step."""
    def fn(dev):
        cls = getattr(fusedbn, cls_name)
        torch.manual_seed(0)
        m = cls(shape[1], momentum=momentum).to(dev)
        out = {}
        for step in range(2):
            x = tensor(shape, dtype, layout, dev, 10 + step).requires_grad_(True)
            dy = tensor(shape, dtype, layout, dev, 20 + step)
            y = m(x)
            y.backward(dy)
            out.update({"y%d" % step: y, "dx%d" % step: x.grad})
        m.eval()
        out["y_eval"] = m(tensor(shape, dtype, layout, dev, 30))
        out.update(running_mean=m.running_mean, running_var=m.running_var,
                   dw=m.weight.grad, db=m.bias.grad)
        return out
    return fn


def empty_case(shape):
    def fn(dev):
        x = torch.empty(shape, device=dev)
        w, b = torch.ones(shape[1], device=dev), torch.zeros(shape[1], device=dev)
        y, mean, invstd, var = ops.forward_train(x, w, b, 1e-5)
        dx, dw, db = ops.backward(torch.empty_like(x), x, w, mean, invstd, True, ALL)
        ye = ops.forward_eval(x, w, b, w.clone(), w.clone(), 1e-5)
        return {"y": y, "mean": mean, "dx": dx, "dw": dw, "db": db, "y_eval": ye}
    return fn


CASES = {
    # contiguous, large planes (S >= 256 vectors)
    "planes_f32": train_case((2, 3, 48, 48), F32, "contiguous"),
    "planes_tail_bf16": train_case((2, 3, 45, 47), BF16, "contiguous"),
    "planes_misaligned_f16": train_case((2, 3, 45, 47), F16, "misaligned"),
    "planes_f64_no_affine": train_case((3, 2, 40, 40), F64, "contiguous", affine=False),
    "planes_bf16_params_bf16": train_case((2, 3, 48, 48), BF16, "contiguous", pdt=BF16),
    "planes_mask_dx_only": train_case((2, 3, 48, 48), F32, "contiguous", mask=[True, False, False]),
    "planes_mask_dw_db": train_case((2, 3, 48, 48), BF16, "contiguous", mask=[False, True, True]),
    # contiguous, small planes
    "packed_vec_f32": train_case((4, 8, 7, 7), F32, "contiguous"),
    "packed_scalar_bf16": train_case((3, 5, 3, 3), BF16, "contiguous"),
    "packed_f64": train_case((4, 6, 14, 14), F64, "contiguous"),
    "packed_ncl_f16": train_case((4, 6, 9), F16, "contiguous"),
    "packed_misaligned_f32": train_case((4, 8, 7, 7), F32, "misaligned"),
    # rows: channels_last and (N, C)
    "rows_vec_f32": train_case((4, 64, 5, 5), F32, "channels_last"),
    "rows_scalar_bf16": train_case((3, 33, 4, 5), BF16, "channels_last"),
    "rows_nc_f16": train_case((37, 33), F16, "contiguous"),
    "rows_nc_vec_f32": train_case((64, 256), F32, "contiguous"),
    "rows_3d_bf16": train_case((2, 16, 3, 4, 5), BF16, "channels_last"),
    "rows_f64": train_case((4, 12, 6, 6), F64, "channels_last"),
    # eval
    "eval_contiguous_f32": eval_case((2, 3, 48, 48), F32, "contiguous"),
    "eval_channels_last_bf16": eval_case((4, 64, 5, 5), BF16, "channels_last"),
    "eval_no_affine_f16": eval_case((37, 33), F16, "contiguous", affine=False),
    # running statistics
    "running_momentum_f32": running_case(F32, 0.1),
    "running_cumulative_f32": running_case(F32, None),
    "running_bf16": running_case(BF16, 0.3),
    "running_f64": running_case(F64, None),
    # synchronized batch norm pieces
    "sync_contiguous_f32": sync_case((2, 3, 48, 48), F32, "contiguous"),
    "sync_channels_last_bf16": sync_case((4, 64, 5, 5), BF16, "channels_last"),
    "sync_packed_f16": sync_case((4, 8, 7, 7), F16, "contiguous"),
    # BN + residual + activation
    "act_relu_mask_contiguous_f32": act_case((2, 3, 48, 48), F32, "contiguous", "relu"),
    "act_relu_mask_channels_last_bf16": act_case((4, 64, 5, 5), BF16, "channels_last", "relu"),
    "act_leaky_recover_f32": act_case((4, 8, 7, 7), F32, "contiguous", "leaky_relu", source=2),
    "act_identity_recover_cl_f16": act_case((4, 64, 5, 5), F16, "channels_last", "identity",
                                            source=2),
    "act_silu_bf16": act_case((2, 3, 45, 47), BF16, "contiguous", "silu"),
    "act_gelu_tanh_cl_f32": act_case((3, 33, 4, 5), F32, "channels_last", "gelu_tanh"),
    "act_relu_no_residual_nc_f32": act_case((37, 33), F32, "contiguous", "relu", residual=False),
    "act_eval_leaky_f32": act_case((4, 8, 7, 7), F32, "contiguous", "leaky_relu", train=False),
    "act_eval_silu_cl_bf16": act_case((4, 64, 5, 5), BF16, "channels_last", "silu",
                                      train=False),
    # modules (the C++ eager entry), momentum None
    "module_bn2d_cumulative_f32": module_case("FusedBatchNorm2d", (4, 8, 9, 9), F32,
                                              "channels_last", momentum=None),
    "module_bn1d_bf16": module_case("FusedBatchNorm1d", (16, 24), BF16, "contiguous"),
    "module_bn3d_f16": module_case("FusedBatchNorm3d", (2, 4, 3, 5, 6), F16, "contiguous"),
    "module_act2d_f32": module_case("FusedBatchNormAct2d", (4, 8, 9, 9), F32, "contiguous"),
    # empty batches
    "empty_batch": empty_case((0, 3, 4, 4)),
    "empty_spatial": empty_case((2, 3, 0, 4)),
}

# More than 2^30 elements: the kernels switch to 64-bit index math (bn_utils.cuh fits_int32).
# About 2.2 GB per bfloat16 tensor, 9 GB in all; the CPU comparison takes a few seconds on 16
# cores (and about 20 GB of host memory).
LARGE = (4, 2, 11600, 11600)
LARGE_CASES = {
    "large_planes_bf16": train_case(LARGE, BF16, "contiguous", make=hashed_tensor),
    "large_rows_bf16": train_case(LARGE, BF16, "channels_last", make=hashed_tensor),
    "large_act_relu_bf16": act_case(LARGE, BF16, "contiguous", "relu", residual=False,
                                    make=hashed_tensor),
}


def compare(name, got, expected):
    """Per tensor: same shape and dtype, NaN-free, max|got - expected| <= TOL * max|expected|.
    Returns a list of failure messages."""
    failures = []
    for key, e in expected.items():
        g = got[key]
        if g.shape != e.shape or g.dtype != e.dtype:
            failures.append("%s %s: shape/dtype %s %s, CPU %s %s"
                            % (name, key, tuple(g.shape), g.dtype, tuple(e.shape), e.dtype))
            continue
        if e.numel() == 0:
            continue
        g64, e64 = g.detach().cpu().double(), e.detach().double()
        if not torch.equal(torch.isnan(g64), torch.isnan(e64)):
            failures.append("%s %s: NaN at %d places, on the CPU at %d"
                            % (name, key, torch.isnan(g64).sum(), torch.isnan(e64).sum()))
            continue
        finite = torch.isfinite(e64)
        if not torch.equal(g64[~finite].nan_to_num(), e64[~finite].nan_to_num()):
            failures.append("%s %s: infinities differ from the CPU's" % (name, key))
            continue
        g64, e64 = g64[finite], e64[finite]
        if e64.numel() == 0:
            continue
        scale = e64.abs().max().item() or 1.0
        err = (g64 - e64).abs().max().item() / scale
        if not err <= TOL[e.dtype]:
            failures.append("%s %s (%s): max|device - cpu| / max|cpu| = %.3g > %.3g"
                            % (name, key, e.dtype, err, TOL[e.dtype]))
    return failures


def run_case(name, device, fn=None):
    """Runs one case on the device and, for a CUDA device, on the CPU; returns failure messages
    (an empty list when the results agree)."""
    fn = fn or {**CASES, **LARGE_CASES}[name]
    got = fn(torch.device(device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return compare(name, got, fn(torch.device("cpu")))
    bad = [k for k, t in got.items() if t.is_floating_point() and torch.isnan(t).any()]
    return ["%s %s: NaN" % (name, k) for k in bad]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--large", action="store_true", help="also the > 2^30-element cases")
    p.add_argument("--only", help="comma list of case names")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    table = dict(CASES, **(LARGE_CASES if args.large else {}))
    if args.list:
        print("\n".join(list(CASES) + list(LARGE_CASES)))
        return 0
    names = args.only.split(",") if args.only else list(table)
    failures, failed = [], 0
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        try:
            bad = run_case(name, args.device, {**CASES, **LARGE_CASES}[name])
        except Exception as e:  # reported per case; the others still run
            bad = ["%s: %s: %s" % (name, type(e).__name__, str(e).splitlines()[0][:300])]
        failures += bad
        failed += bool(bad)
        print("%-40s %s (%.2f s)" % (name, "FAILED" if bad else "ok", time.perf_counter() - t),
              flush=True)
    print("sanitizer_cases: %d cases on %s, %d failed, %.1f s"
          % (len(names), args.device, failed, time.perf_counter() - t0))
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
