"""One rank of the multi-process FusedSyncBatchNorm tests (tests/test_sync_batchnorm.py).

Every rank builds the same full batch from a seed, runs FusedSyncBatchNorm on its own slice of it,
and compares with one process running nn.BatchNorm2d on the whole batch (the float64 reference and
torch in the case's dtypes, through bn_testing's rule): its slice of the output and of grad_input,
the running statistics, and grad_weight/grad_bias summed over the ranks (each rank's share, as
nn.SyncBatchNorm returns them). Results go to <out_dir>/rank<r>.json, one entry per case.

This module imports only the standard library and torch at the top: the spawned process first puts
the parent's fusedbn on sys.path, so that it tests the same build as the parent.
"""
import copy
import datetime
import json
import os
import sys
import time
import traceback
import zlib

import torch

TIMEOUT_S = 30  # the process group's timeout: a bug that leaves a peer waiting ends here

# name: per-rank batch sizes, dtype, parameter dtype, layout, module options, process group ranks
# (None: the whole world).
CASES = {
    2: {
        "f32_nchw": dict(sizes=(3, 5), dtype="float32"),
        "f64_nchw": dict(sizes=(3, 5), dtype="float64"),
        "f32_channels_last": dict(sizes=(5, 3), dtype="float32", layout="channels_last"),
        "bf16_f32params": dict(sizes=(3, 5), dtype="bfloat16", param_dtype="float32"),
        "bf16_channels_last": dict(sizes=(4, 4), dtype="bfloat16", layout="channels_last"),
        "momentum_none": dict(sizes=(2, 6), dtype="float64", options=dict(momentum=None)),
        "no_affine_no_stats": dict(sizes=(3, 5), dtype="float32",
                                   options=dict(affine=False, track_running_stats=False)),
        "one_value_per_rank": dict(sizes=(1, 1), dtype="float64", hw=(1, 1)),
    },
    3: {
        "f32_empty_rank": dict(sizes=(2, 0, 4), dtype="float32"),
        "f64_empty_rank_channels_last": dict(sizes=(2, 0, 4), dtype="float64",
                                             layout="channels_last"),
        "bf16_uneven": dict(sizes=(1, 2, 5), dtype="bfloat16", param_dtype="float32",
                            layout="channels_last"),
        "f64_momentum_none_uneven": dict(sizes=(4, 1, 2), dtype="float64",
                                         options=dict(momentum=None)),
        "subgroup_1_2": dict(sizes=(3, 2), dtype="float64", group=(1, 2)),
    },
}
FAILURE_CASES = {2: ("bad_channels_rank1", "timeout_peer_skips"), 3: ("bad_channels_subgroup",)}
STEPS = 3

# float32 precision across ranks (the CPU only: issue 12's float64 accumulation), per world size:
# name: per-rank batch sizes, layout. Channel c has |mean| / std = PRECISION_RATIOS[c] and the
# samples drift by +-1 std from the first to the last of the batch, so that the ranks' means
# differ and the merge's between-rank term n_r (mean_r - mean)^2 carries weight. Every result,
# measured against float64 channel by channel (max |ours - ref| over the channel's values), must
# be within 2x torch's own float32 NCHW error on the whole batch in one process (nn.BatchNorm2d)
# plus a floor of 4 float32 roundings of the channel's magnitude (PRECISION_FLOOR_EPS * eps *
# max|ref|; test_cpu_accumulation.py's rule, per channel).
PRECISION_CASES = {
    2: {"f32_large_mean": dict(sizes=(4, 4)),
        "f32_large_mean_channels_last": dict(sizes=(3, 5), layout="channels_last")},
    3: {"f32_large_mean_uneven": dict(sizes=(2, 5, 1))},
}
PRECISION_RATIOS = (0.0, 1e2, 1e4, 1e6)
PRECISION_FLOOR_EPS = 4
PRECISION_STEPS = 2


def _dtype(name):
    return getattr(torch, name)


def _run_case(rank, device, spec, seed, world_group):
    import bn_testing as bt
    import torch.distributed as dist
    from torch import nn

    import fusedbn

    dtype = _dtype(spec["dtype"])
    pdtype = _dtype(spec.get("param_dtype", spec["dtype"]))
    layout = spec.get("layout", "contiguous")
    options = spec.get("options", {})
    sizes = spec["sizes"]
    ranks = spec.get("group") or tuple(range(len(sizes)))
    group = world_group[ranks] if spec.get("group") else None
    if rank not in ranks:  # a rank outside the layer's group must not run it
        layer = fusedbn.FusedSyncBatchNorm(4, process_group=group)
        try:
            layer(torch.randn(2, 4, 3, 3, device=device))
        except RuntimeError as err:
            assert "not a member" in str(err), str(err)
            return
        raise AssertionError("a rank outside process_group ran the layer without an error")
    me = ranks.index(rank)
    C, (H, W) = 4, spec.get("hw", (3, 5))
    torch.manual_seed(seed)  # the same modules and batches on every rank
    base = bt.randomize_(nn.BatchNorm2d(C, device=device, dtype=pdtype, **options),
                         num_batches_tracked=3 if options.get("momentum", 0.1) is None else None)
    ours = fusedbn.FusedSyncBatchNorm(C, device=device, dtype=pdtype, process_group=group,
                                      **options)
    ours.load_state_dict(base.state_dict())
    trio = type("Trio", (), {})()
    trio.fused, trio.ref, trio.param_dtype = ours, copy.deepcopy(base).double(), pdtype
    trio.theirs = base if bt.torch_supports(dtype, pdtype) else None
    lo, hi = sum(sizes[:me]), sum(sizes[:me + 1])
    for step in range(STEPS + 1):
        train = step < STEPS  # the last step in eval mode (the local path)
        for m in (trio.fused, trio.ref, trio.theirs):
            if m is not None:
                m.train(train)
        values = bt.random_values((sum(sizes), C, H, W))
        x = bt.in_layout(values, dtype, layout, device)
        dy = bt.in_layout(torch.randn(values.shape, dtype=torch.float64), dtype, layout, device)
        # nn.SyncBatchNorm synchronizes in training only: in eval mode without running statistics
        # every rank normalizes with its own batch's statistics, so the reference sees that alone.
        local = not train and trio.ref.running_mean is None
        if local:
            x, dy = x[lo:hi], dy[lo:hi]
        mine = slice(None) if local else slice(lo, hi)
        y, dx, dw, db = bt.forward_backward(ours, x[mine], dy[mine])
        ry, rdx, rdw, rdb = bt.forward_backward(trio.ref, x.double(), dy.double())
        ry, rdx = ry[mine], rdx[mine]
        if trio.theirs is not None:
            ty, tdx, tdw, tdb = bt.forward_backward(trio.theirs, x, dy)
            ty, tdx = ty[mine], tdx[mine]
        else:
            ty = tdx = tdw = tdb = None
        r = trio.ref
        sc = bt.term_scales(x, dy, r.weight, r.bias, train or r.running_mean is None, r.eps,
                            r.running_mean, r.running_var)
        what = f"step {step} ({'train' if train else 'eval'}), rank {rank}: "
        bt.assert_parity(what + "output", y, ty, ry, dtype, sc["output"][mine])
        bt.assert_parity(what + "grad_input", dx, tdx, rdx, dtype, sc["grad_input"][mine])
        if layout == "channels_last" and y.numel():
            assert bt.is_channels_last(y) and bt.is_channels_last(dx), what + "layout lost"
        for name, ours_g, theirs_g, ref_g in (("grad_weight", dw, tdw, rdw),
                                              ("grad_bias", db, tdb, rdb)):
            if ours_g is None:
                assert ref_g is None
                continue
            total = ours_g.double()  # each rank's share, added up (what DDP does)
            if not local:
                dist.all_reduce(total, group=group)
            bt.assert_parity(what + name, total.to(pdtype), theirs_g, ref_g, pdtype, sc[name])
        bt.check_buffers(trio, what)


def _precision_case(rank, spec, seed):
    """One PRECISION_CASES entry on the CPU: {quantity at step: per channel (err_ours, err_torch,
    floor)} over this rank's slice (output, grad_input) or the whole (the rest), and the
    failures."""
    import bn_testing as bt
    import torch.distributed as dist
    from torch import nn

    import fusedbn

    sizes, layout = spec["sizes"], spec.get("layout", "contiguous")
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    N, C, H, W = sum(sizes), len(PRECISION_RATIOS), 6, 5
    view = (1, C, 1, 1)
    torch.manual_seed(seed)  # the same modules and batches on every rank
    base = bt.randomize_(nn.BatchNorm2d(C))  # float32: torch's own, on the whole batch (NCHW)
    ours = fusedbn.FusedSyncBatchNorm(C)
    ours.load_state_dict(base.state_dict())
    ref = copy.deepcopy(base).double()
    std = (0.5 + torch.rand(C, dtype=torch.float64)).view(view)
    mean = torch.tensor(PRECISION_RATIOS, dtype=torch.float64).view(view) * std
    drift = torch.linspace(-1, 1, N, dtype=torch.float64).view(N, 1, 1, 1) * std
    eps32 = torch.finfo(torch.float32).eps
    errors, failures = {}, []
    for step in range(PRECISION_STEPS):
        x = (mean + drift + std * torch.randn(N, C, H, W, dtype=torch.float64)).float()
        dy = torch.randn(N, C, H, W, dtype=torch.float64).float()
        mine = bt.in_layout(x[lo:hi].double(), torch.float32, layout, "cpu")
        y, dx, dw, db = bt.forward_backward(ours, mine, dy[lo:hi].contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else
            torch.contiguous_format))
        ry, rdx, rdw, rdb = bt.forward_backward(ref, x.double(), dy.double())
        ty, tdx, tdw, tdb = bt.forward_backward(base, x, dy)
        dw, db = dw.double(), db.double()
        dist.all_reduce(dw)  # each rank's share, added up (what DDP does)
        dist.all_reduce(db)
        quantities = [("output", y, ty[lo:hi], ry[lo:hi]),
                      ("grad_input", dx, tdx[lo:hi], rdx[lo:hi]),
                      ("grad_weight", dw, tdw, rdw), ("grad_bias", db, tdb, rdb),
                      ("running_mean", ours.running_mean, base.running_mean, ref.running_mean),
                      ("running_var", ours.running_var, base.running_var, ref.running_var)]
        for name, o, t, r in quantities:
            if r.numel() == 0:
                continue
            r = r.detach().double()

            def per_channel(v):  # max over each channel's values
                return v.transpose(0, 1).reshape(C, -1).amax(1) if v.dim() > 1 else v
            e_o = per_channel((o.detach().double() - r).abs())
            e_t = per_channel((t.detach().double() - r).abs())
            floor = PRECISION_FLOOR_EPS * eps32 * per_channel(r.abs())
            key = f"{name} (step {step})"
            errors[key] = [e_o.tolist(), e_t.tolist(), floor.tolist()]
            for c in range(C):
                if not e_o[c] <= 2 * e_t[c] + floor[c]:
                    failures.append(
                        f"rank {rank}: {key}, channel {c} (|mean| / std = "
                        f"{PRECISION_RATIOS[c]:g}): error {e_o[c]:.3g} > 2 x torch's "
                        f"{e_t[c]:.3g} + floor {floor[c]:.3g}")
    return {"ok": not failures, "failures": failures, "errors": errors}


def _failure_bad_channels(rank, device, group, ranks, failing):
    """The (global) rank `failing` calls the layer with 5 channels instead of 4; every rank of
    `ranks` (those of `group`) records what it raised and how long it took."""
    import fusedbn

    if rank not in ranks:
        return {"skipped": True}
    layer = fusedbn.FusedSyncBatchNorm(4, process_group=group).to(device)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 5 if rank == failing else 4, 2, 2, device=device)
    start = time.monotonic()
    try:
        layer(x)
        error = None
    except Exception as err:
        error = err
    after = layer.state_dict()
    result = {"seconds": time.monotonic() - start,
              "type": type(error).__name__ if error else None,
              "message": str(error) if error else None,
              "state_unchanged": all(torch.equal(v, after[k]) for k, v in state.items())}
    # The group still works after the failure: a good step on every rank.
    y = layer(torch.randn(3, 4, 2, 2, device=device))
    result["recovered"] = bool(torch.isfinite(y).all())
    return result


def _failure_timeout(rank, device, world_group):
    """Rank 1 never calls the layer (as if it had crashed or taken another code path): rank 0
    must get an error naming itself once its group's (short) timeout has passed."""
    import fusedbn

    group = world_group["short_timeout"]
    if rank != 0:
        return {"skipped": True}
    layer = fusedbn.FusedSyncBatchNorm(4, process_group=group).to(device)
    start = time.monotonic()
    try:
        layer(torch.randn(3, 4, 2, 2, device=device))
        return {"type": None}
    except Exception as err:
        return {"seconds": time.monotonic() - start, "type": type(err).__name__,
                "message": str(err)}


def run(rank, world, init_file, device, fusedbn_dir, out_dir):
    sys.path.insert(0, fusedbn_dir)  # the parent's fusedbn, whatever the working directory
    torch.set_num_threads(1)
    import torch.distributed as dist

    import fusedbn
    assert os.path.dirname(os.path.dirname(fusedbn.__file__)) == fusedbn_dir, fusedbn.__file__
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world, timeout=timeout)
    # Groups are created by every rank, in the same order.
    world_group = {None: None}  # None: the default group
    for spec in CASES[world].values():
        if spec.get("group"):
            world_group[spec["group"]] = dist.new_group(list(spec["group"]), timeout=timeout)
    world_group["short_timeout"] = dist.new_group(
        list(range(world)), timeout=datetime.timedelta(seconds=3))
    results = {}
    if device == "cpu":
        for name, spec in PRECISION_CASES[world].items():
            try:
                results[name] = _precision_case(rank, spec, zlib.crc32(name.encode()))
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    for name, spec in CASES[world].items():
        try:
            _run_case(rank, device, spec, zlib.crc32(name.encode()), world_group)
            results[name] = {"ok": True}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()  # a failed case must not shift the collectives of the next one
    for name in FAILURE_CASES[world]:
        try:
            if name == "bad_channels_rank1":
                results[name] = _failure_bad_channels(rank, device, None, (0, 1), 1)
            elif name == "bad_channels_subgroup":
                results[name] = _failure_bad_channels(rank, device, world_group[(1, 2)], (1, 2),
                                                      2)
            else:
                results[name] = _failure_timeout(rank, device, world_group)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
