"""Run a function on every rank of a CPU gloo group of spawned processes, for the expert-parallel tests.

``run_group(world, "module:function", *args)`` starts ``world`` processes (spawn, 1 thread each), joins them into a
gloo group through a file store in a fresh temporary directory (no port, so parallel test runs cannot collide) with
a collective timeout, calls ``function(rank, world, *args)`` in each and returns each rank's result. A rank that
raises fails the caller with that rank's traceback; a group still running at the deadline is killed and fails it
too (a stuck collective ends at the collective timeout first, as an exception in the rank that waited).
Results of whole groups are cached per arguments (:func:`group_results`), so several test modules share one spawn.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback

COLLECTIVE_TIMEOUT_S = 30


def _child(rank: int, world: int, store: str, out_dir: str, target: str, args: tuple, backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    payload: tuple
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        extra = {}
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
            extra["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **extra)
        module, name = target.split(":")
        payload = ("ok", getattr(importlib.import_module(module), name)(rank, world, *args))
        dist.destroy_process_group()
    except BaseException:  # everything reaches the parent, as text
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)


class GroupFailed(AssertionError):
    pass


def run_group(world: int, target: str, *args, deadline_s: float = 240.0, backend: str = "gloo") -> list:
    """``[result of rank 0, ...]`` of ``target(rank, world, *args)`` run in ``world`` processes (``backend``
    "gloo" on CPU; "nccl" puts rank r on GPU r)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="qwen3moe_ep_") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(r, world, store, tmp, target, args, backend), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                why = "still running at the deadline (killed)" if r in hung else f"exit code {procs[r].exitcode}"
                errors.append(f"rank {r}: no result ({why})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} raised:\n{value}")
            results.append(value)
        if errors:
            raise GroupFailed(f"{target} on {world} {backend} ranks failed:\n" + "\n".join(errors))
        return results


@functools.lru_cache(maxsize=None)
def group_results(world: int, target: str, *args) -> list:
    """:func:`run_group`, once per arguments per test session; a failure is cached and re-raised too."""
    try:
        return run_group(world, target, *args)
    except GroupFailed as e:
        return [e] * world


def results_or_raise(world: int, target: str, *args) -> list:
    got = group_results(world, target, *args)
    if isinstance(got[0], GroupFailed):
        raise got[0]
    return got


def raise_or_wait(rank: int, world: int, hang: bool) -> int:
    """For the harness's own test: the last rank raises (or, ``hang``, sleeps past any deadline), the others wait
    for it in a barrier."""
    import torch.distributed as dist

    if rank == world - 1:
        if hang:
            time.sleep(600)
        raise ValueError(f"rank {rank} fails on purpose")
    dist.barrier()
    return rank
