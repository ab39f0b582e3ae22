"""The collectives expert parallelism uses, all ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU):
equal-split exchanges of small int64 tables and uneven-split exchanges of rows ``[n, ...]``. ``collective_timer``
adds up the time spent in them (wall time: meaningful where the collective is synchronous, as gloo's on CPU; NCCL's
are asynchronous and would need a device sync). Design: ``docs/parallel.md``.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

_timers: list[dict] = []


def rank_world(group) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ``group=None`` is the default (world) group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert parallelism needs torch.distributed initialized (dist.init_process_group, e.g. "
                         "under torchrun) before an ep_group is used")
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of ep_group")
    return rank, dist.get_world_size(group)


@contextlib.contextmanager
def collective_timer():
    """``with collective_timer() as t:`` ... ``t["seconds"]``, ``t["calls"]``: time spent in this module's
    all-to-alls (waiting for the slowest rank included) while the block ran."""
    t = {"seconds": 0.0, "calls": 0}
    _timers.append(t)
    try:
        yield t
    finally:
        _timers.remove(t)


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    t0 = time.perf_counter() if _timers else 0.0
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    if _timers:
        dt = time.perf_counter() - t0
        for t in _timers:
            t["seconds"] += dt
            t["calls"] += 1
    return out


def exchange_equal(t: torch.Tensor, group) -> torch.Tensor:
    """``t [world, ...]``: row r goes to rank r; returns ``[world, ...]``, row s from rank s."""
    t = t.contiguous()
    return _all_to_all(torch.empty_like(t), t, None, None, group)


def exchange_rows(t: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
    """Rows of ``t [sum(send_sizes), ...]``, ``send_sizes[r]`` of them to rank r in order; returns the
    ``[sum(recv_sizes), ...]`` rows received, rank 0's first. Zero sizes are allowed anywhere."""
    t = t.contiguous()
    out = t.new_empty((sum(recv_sizes),) + tuple(t.shape[1:]))
    return _all_to_all(out, t, recv_sizes, send_sizes, group)


def host_device(group) -> torch.device:
    """Where a small int table must live for ``group``'s backend: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's ``values`` (the same length everywhere), rank 0's first: one small all-gather and host read."""
    group = group or dist.group.WORLD
    mine = torch.tensor(values, dtype=torch.int64, device=host_device(group))
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)  # the list form: gloo has no all_gather_into_tensor
    return torch.stack(out).tolist()
