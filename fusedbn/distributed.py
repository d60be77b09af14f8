"""The collectives of synchronized batch norm (fusedbn.FusedSyncBatchNorm): one per direction.

Forward: every rank packs its own batch statistics -- count n, per-channel mean and
M2 = var * n -- into ONE float64 tensor of 2C + 1 values, [n, mean[0..C), M2[0..C)]; one
all_gather gives every rank the (W, 2C + 1) table of all W ranks, in group-rank order; every rank
merges the table with the same float64 arithmetic, so every rank normalizes with the same numbers.
The merge is Chan's formula applied to all ranks at once (the pairwise formula of csrc/welford.h,
n = nA + nB, mean = mean_A + d nB / n, M2 = M2_A + M2_B + d^2 nA nB / n, unrolled over W states):

    n = sum_r n_r,   mean = sum_r n_r mean_r / n,   M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2

which is exact algebra (no approximation such as averaging variances), needs no pass over the data
and lets a rank with n_r = 0 contribute exactly nothing. Counts travel as float64: exact up to 2^53.

Backward: one all_reduce (sum) of [sum_dy[0..C), sum_dy_xmu[0..C)] in the dtype backward_reduce
gives them (the accumulation type of the input's device: float64 for float32 input on the CPU).

Failure protocol: a rank whose input is invalid cannot contribute statistics, but its peers are
already waiting in the all_gather. So it still joins the all_gather, with count -1 as a sentinel
(and NaN statistics); then it raises its own error. Every other rank reads the counts (the one
host read of the step, which any rank-dependent error needs), finds the -1 and raises
RankFailedError naming the failed rank(s). Nobody waits for a collective that will never come.
Anything else -- a peer that crashed, hangs, or skipped the layer -- ends at the process group's
timeout, and the error says which rank it happened on.
"""
import torch
import torch.distributed as dist

_FAILED = -1.0  # the count a rank sends when its own input was rejected

# all_gather_single is the current name (torch >= 2.11); all_gather_into_tensor the older one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankFailedError(RuntimeError):
    """Raised on the healthy ranks when another rank of the group rejected its input before the
    statistics exchange. `ranks` lists the failed ranks of the group (group ranks)."""

    def __init__(self, message, ranks):
        super().__init__(message)
        self.ranks = ranks


def describe_rank(group, group_rank):
    """'rank 1', or 'rank 1 (global rank 5)' when the group is not the default group."""
    text = f"rank {group_rank}"
    if group is not None and group is not dist.group.WORLD:
        global_rank = dist.get_global_rank(group, group_rank)
        if global_rank != group_rank:
            text += f" (global rank {global_rank})"
    return text


def _where(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return f"{describe_rank(group, rank)} of {world}"


def _collective(fn, what, group, *args):
    """Runs a blocking collective; a failure (timeout, a peer that went away) is re-raised naming
    this rank and the step, with the backend's own message."""
    try:
        fn(*args, group=group)
    except Exception as err:
        raise RuntimeError(
            f"fusedbn.FusedSyncBatchNorm: {what} failed on {_where(group)}: a peer rank probably "
            "crashed, hung, raised before reaching this layer, or called it with a different "
            "num_features; the wait is bounded by the process group's timeout "
            f"(init_process_group(timeout=...)). Backend error: {err}") from err


def _pack(count, mean, var):
    """[n, mean[C], M2[C]] in float64 (M2 = var * n: batch_stats' var is M2 / n; batch_stats gives
    float64 for float32 input on the CPU, so nothing is rounded there)."""
    mean64, var64 = mean.to(torch.float64), var.to(torch.float64)
    n = torch.full((1,), float(count), dtype=torch.float64, device=mean.device)
    return torch.cat([n, mean64, var64 * count])


def _failure_packet(num_features, device):
    packet = torch.full((2 * num_features + 1,), float("nan"), dtype=torch.float64, device=device)
    packet[0] = _FAILED
    return packet


def _merge(table, counts, num_features):
    """Chan's merge of the W gathered states (rows of `table`) -> (mean, biased var) in float64
    and the total count (a Python int)."""
    C = num_features
    total = int(sum(counts))
    if total == 0:  # every rank had an empty batch: nothing to normalize, nothing to update
        zeros = table.new_zeros(C)
        return zeros, zeros.clone(), 0
    n = table[:, :1]
    means, m2s = table[:, 1:C + 1], table[:, C + 1:]
    # An empty rank sends mean 0 and M2 0 with n 0: every term below is then exactly 0.
    mean = (n * means).sum(0) / total
    m2 = m2s.sum(0) + (n * (means - mean).square()).sum(0)
    return mean, m2 / total, total


def gather_batch_stats(local_stats, num_features, device, group):
    """The forward exchange. local_stats() validates this rank's arguments and returns
    (count, mean, var) of its batch, or raises; either way this rank joins the all_gather (device:
    where the packet lives -- the layer's device, so that a rank whose input is on the wrong
    device still speaks the backend's language). Returns (mean, var, total) of the whole batch:
    float64 mean and biased variance of shape (C,), total the number of values per channel over
    all ranks. Raises this rank's own error when local_stats failed, RankFailedError when another
    rank's did."""
    error = None
    try:
        count, mean, var = local_stats()
        packet = _pack(count, mean, var)
    except Exception as err:  # re-raised below, after the peers have been told
        error = err
        packet = _failure_packet(num_features, device)
    world = dist.get_world_size(group)
    flat = packet.new_empty(world * packet.numel())  # the concatenated form: every backend's
    try:
        _collective(_all_gather_single, "the all_gather of the batch statistics", group, flat,
                    packet)
    except RuntimeError as comm_error:
        if error is not None:
            raise error from comm_error
        raise
    if error is not None:
        raise error
    table = flat.view(world, -1)
    counts = table[:, 0].tolist()  # W values: the step's only device-to-host read
    failed = [r for r, n in enumerate(counts) if n < 0]
    if failed:
        names = ", ".join(describe_rank(group, r) for r in failed)
        raise RankFailedError(
            f"fusedbn.FusedSyncBatchNorm: {names} of the process group rejected its input before "
            f"the statistics exchange (see the error raised on that rank); this step was not "
            f"computed on {_where(group)} either, and no running statistics were updated", failed)
    return _merge(table, counts, num_features)


def all_reduce_grad_sums(sum_dy, sum_dy_xmu, group):
    """The backward exchange: the sums of every rank, added, in one all_reduce."""
    C = sum_dy.numel()
    packed = torch.cat([sum_dy, sum_dy_xmu])
    _collective(dist.all_reduce, "the all_reduce of the gradient sums", group, packed)
    return packed[:C], packed[C:]
