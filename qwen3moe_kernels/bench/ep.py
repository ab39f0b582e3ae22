"""Expert parallelism on CPU: ``world`` gloo processes (default 2) x 1 thread, each with its own T tokens and its
1/world of the Qwen3-30B-A3B experts (H=2048, I=768, E=128, top-8).

Rows per T (tokens per rank), each the slowest rank's median: ``ep_dispatch``, ``ep_experts`` (``moe_experts`` on
the rows received) and ``ep_combine``, timed apart, with the all-to-all time inside them (``alltoall_ms``, waiting
for the other rank included); ``ep_fused_moe``, the whole block (``ops.fused_moe(..., ep_group=)``, router
included), with the three steps' medians and the all-to-all share of their sum; and ``fused_moe`` on one process
with all the experts on the same T tokens (impl "1 process": 1 thread, every rank at once); and the CPU's limits
under the same load, every rank at once (op "cpu_limit": an fp32 sum over 512 MB, torch.mm at M=512), of which
``ep_experts`` reports its local weight read (``frac_read_bw``) and its rate (``frac_mm``). Checked first against
single-process ``fused_moe`` on every rank's tokens. On GPUs the same code runs under torchrun
(``docs/parallel.md``); this module is CPU only.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time
import traceback
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .fused_moe import QWEN3_30B_A3B, add_limit_fractions, cpu_limit_fns, make_moe_weights
from .machine import default_dtype, dtype_name, machine_info
from .report import add_rates, op_row
from .timing import summarize

COLLECTIVE_TIMEOUT_S = 600


def _runs(fns: dict, budget_s: float, min_runs: int, max_runs: int, group) -> dict[str, list[float]]:
    """Time each of ``fns`` (each returning its own seconds) the same number of times on every rank, interleaved
    (round i starts at function i mod len(fns): the machine's drift spreads over all of them): the ranks agree on
    the count from a timed first round (the slowest rank's), since each call is a collective."""
    from ..parallel.comm import gather_ints

    names = list(fns)
    times = {n: [fns[n]()] for n in names}  # the first round, which sets the count
    first = sum(t[0] for t in times.values())
    want = max(min_runs, min(max_runs, int(budget_s * len(names) / max(first, 1e-6))))
    rounds = max(v[0] for v in gather_ints([want], group))
    for i in range(1, rounds):
        for n in names[i % len(names):] + names[: i % len(names)]:
            times[n].append(fns[n]())
    return times


def _bench_rank(rank: int, world: int, token_counts: Sequence[int], dtype: torch.dtype, shapes: dict,
                budget_s: float, min_runs: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from .. import ops, parallel
    from ..tolerances import tol

    group = dist.group.WORLD
    H, I, E, k = shapes["hidden"], shapes["moe_intermediate"], shapes["experts"], shapes["top_k"]
    info = machine_info("cpu")
    full = make_moe_weights(H, I, E, dtype, "cpu", seed=0)  # the same on every rank
    router = full["router_weight"]
    wgu, wd = (parallel.shard_experts(full[n], group).clone() for n in ("w_gate_up", "w_down"))
    impl = f"gloo {world} ranks x 1 thread"
    limit_fns, limit_fields = cpu_limit_fns(dtype)
    rows = []
    for T in token_counts:
        g = torch.Generator().manual_seed(1000 + T)
        xs = [torch.randn(T, H, generator=g).to(dtype) for _ in range(world)]
        x = xs[rank]
        mine = slice(T * rank, T * (rank + 1))
        with torch.inference_mode():
            out, _ = ops.fused_moe(x, router, wgu, wd, k, True, ep_group=group)
            ref = ops.fused_moe(torch.cat(xs), router, full["w_gate_up"], full["w_down"], k, True)[0][mine]
            try:
                torch.testing.assert_close(out, ref, **tol("gemm", dtype))
                check = "pass"
            except AssertionError:
                check = "FAIL"
            identical = bool(torch.equal(out, ref))
            weights, ids = ops.router_topk(F.linear(x, router), k, True)

            def steps():
                dist.barrier(group=group)  # the ranks start together: a wait inside is the exchange's
                with parallel.collective_timer() as a2a_d:
                    t0 = time.perf_counter()
                    rows_in, handle = parallel.dispatch(x, ids, weights, group, E)
                    t1 = time.perf_counter()
                unit = torch.ones((rows_in.shape[0], 1))
                t2 = time.perf_counter()
                y = ops.moe_experts(rows_in, wgu, wd, handle.expert_ids[:, None], unit)
                t3 = time.perf_counter()
                with parallel.collective_timer() as a2a_c:
                    parallel.combine(y, handle)
                    t4 = time.perf_counter()
                step_times.append((t1 - t0, t3 - t2, t4 - t3, a2a_d["seconds"], a2a_c["seconds"]))
                last_handle[:] = [handle]  # the same routing every call: its rows per local expert
                return t4 - t0

            last_handle: list = []

            def block():
                dist.barrier(group=group)
                t0 = time.perf_counter()
                ops.fused_moe(x, router, wgu, wd, k, True, ep_group=group)
                return time.perf_counter() - t0

            def single():
                t0 = time.perf_counter()
                ops.fused_moe(x, router, full["w_gate_up"], full["w_down"], k, True)
                return time.perf_counter() - t0

            def limit(fn):
                def timed():
                    dist.barrier(group=group)  # every rank at once: the load the steps run under
                    t0 = time.perf_counter()
                    fn(x)
                    return time.perf_counter() - t0
                return timed

            step_times: list[tuple] = []
            fns = {"steps": steps, "block": block, "single": single, **{n: limit(f) for n, f in limit_fns.items()}}
            for f in fns.values():  # warm-up
                f()
            step_times.clear()
            timed = _runs(fns, budget_s, min_runs, 200, group)
            block_s, single_s = timed["block"], timed["single"]
            limit_s = {n: timed[n] for n in limit_fns}
            hit = last_handle[0].expert_ids.unique().numel()  # the local experts whose weights ep_experts reads
            n_rows = last_handle[0].expert_ids.numel()

        def ms(values):
            return summarize([v * 1e3 for v in values])

        cols = list(zip(*step_times))
        a2a = [d + c for d, c in zip(cols[3], cols[4])]
        step_sum = [d + e + c for d, e, c in zip(cols[0], cols[1], cols[2])]
        common = dict(shape=f"H={H} I={I} E={E} k={k}, {E // world} experts per rank", ranks=world,
                      threads_per_rank=torch.get_num_threads(), rank=rank, check=check, bit_identical=identical)
        limits = {}
        for n, f in limit_fields.items():  # read: fp32; mm: the block's dtype
            limits[n] = op_row(f["op"], f["impl"], T, torch.float32 if n == "read" else dtype, info, ms(limit_s[n]),
                               **common)
            add_rates(limits[n], f.get("flops"), f.get("bytes"), None)
        step_rows = []
        for op, values, extra in (("ep_dispatch", cols[0], {"alltoall_ms": ms(cols[3])["median_ms"]}),
                                  ("ep_experts", cols[1], {}),
                                  ("ep_combine", cols[2], {"alltoall_ms": ms(cols[4])["median_ms"]})):
            step_rows.append(op_row(op, impl, T, dtype, info, ms(values), **extra, **common))
        experts = step_rows[1]  # its weight read (the hit local experts) and GEMM rate against the limits
        experts["weight_bytes"] = hit * 3 * I * H * full["w_down"].element_size()
        add_rates(experts, 2.0 * n_rows * 3 * I * H, None, None)
        add_limit_fractions([experts], limits["read"], limits["mm"])
        rows += step_rows
        rows.append(op_row("ep_fused_moe", impl, T, dtype, info, ms(block_s),
                           alltoall_share_this_rank=statistics.median(a / s for a, s in zip(a2a, step_sum)),
                           **common))
        rows.append(op_row("fused_moe", "1 process (all experts)", T, dtype, info, ms(single_s), **common))
        rows += [limits["read"], limits["mm"]]
    return rows


def _rank_main(rank: int, world: int, store: str, out_dir: str, kwargs: dict) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        payload = ("ok", _bench_rank(rank, world, **kwargs))
        dist.destroy_process_group()
    except BaseException:  # reported by the parent as an error row
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)


def _slowest(per_rank: list[list[dict]]) -> list[dict]:
    """One row per (op, impl, T): the slowest rank's, with every rank's median beside it. The block's row takes
    its step times from the steps' rows (each the slowest rank's), so that they add up as printed."""
    out = []
    for rows in zip(*per_rank):
        worst = dict(max(rows, key=lambda r: r["median_ms"]))
        worst["per_rank_median_ms"] = [r["median_ms"] for r in rows]
        worst["check"] = "FAIL" if any(r["check"] == "FAIL" for r in rows) else "pass"
        worst["bit_identical"] = all(r["bit_identical"] for r in rows)
        out.append(worst)
    steps = {(r["op"], r["tokens"]): r for r in out}
    for r in out:
        if r["op"] == "ep_fused_moe":
            d, e, c = (steps[(op, r["tokens"])] for op in ("ep_dispatch", "ep_experts", "ep_combine"))
            r.update(dispatch_ms=d["median_ms"], experts_ms=e["median_ms"], combine_ms=c["median_ms"],
                     alltoall_ms=d["alltoall_ms"] + c["alltoall_ms"])
            r["alltoall_share"] = r["alltoall_ms"] / (r["dispatch_ms"] + r["experts_ms"] + r["combine_ms"])
    return out


def run(device, token_counts: Sequence[int], dtype: torch.dtype | None = None, shapes: dict | None = None,
        world: int = 2, budget_s: float = 1.0, min_runs: int = 5, log=print) -> list[dict[str, Any]]:
    """Rows for each T of ``token_counts`` (tokens per rank); see the module doc. CPU only."""
    if torch.device(device).type != "cpu":
        raise ValueError("the ep benchmark runs CPU processes over gloo; on GPUs run the same code under torchrun "
                         "(docs/parallel.md)")
    dtype = dtype or default_dtype("cpu")
    shapes = dict(QWEN3_30B_A3B, **(shapes or {}))
    kwargs = dict(token_counts=list(token_counts), dtype=dtype, shapes=shapes, budget_s=budget_s, min_runs=min_runs)
    ctx = mp.get_context("spawn")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the ranks: 1 thread each from their start
    try:
        with tempfile.TemporaryDirectory(prefix="qwen3moe_bench_ep_") as tmp:
            procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "store"), tmp, kwargs))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            results = []
            for r in range(world):
                path = os.path.join(tmp, f"rank{r}.pkl")
                if not os.path.exists(path):
                    raise RuntimeError(f"ep benchmark: rank {r} exited with code {procs[r].exitcode} and no result")
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
                if status == "error":
                    raise RuntimeError(f"ep benchmark: rank {r} raised:\n{value}")
                results.append(value)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    rows = _slowest(results)
    if log:
        log(f"ep: {world} gloo ranks x 1 thread, {dtype_name(dtype)}, {shapes}; per T (tokens per rank), the "
            f"slowest rank's medians:")
        by = {(r["op"], r["impl"][:4], r["tokens"]): r for r in rows}
        for r in rows:
            if r["op"] == "ep_fused_moe":
                T = r["tokens"]
                ex, read, mm = by[("ep_experts", "gloo", T)], by[("cpu_limit", "read", T)], by[("cpu_limit", "mm: ", T)]
                log(f"  T={T:>4}: block {r['median_ms']:8.2f} ms = dispatch {r['dispatch_ms']:.2f} + "
                    f"experts {r['experts_ms']:.2f} + combine {r['combine_ms']:.2f} (+ router); all-to-all "
                    f"{r['alltoall_ms']:.2f} ms = {100 * r['alltoall_share']:.1f}% of the three steps "
                    f"({r['check']}{', bit-identical' if r['bit_identical'] else ''})")
                log(f"          experts read {ex.get('weight_gbps', 0):.1f} GB/s = "
                    f"{ex.get('frac_read_bw', 0):.0f}% of read {read.get('gbps', 0):.1f} GB/s, "
                    f"{ex.get('frac_mm', 0):.0f}% of mm {1e3 * mm.get('tflops', 0):.0f} GFLOP/s (per rank, "
                    f"every rank at once)")
    return rows
