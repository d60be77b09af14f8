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
