"""Timing: median, p10 and p90 of many calls, rotating over input sets; CUDA timed with device events.

``time_fn`` times one implementation, ``time_interleaved`` several in rounds (one call of each per round),
``cuda_graphed`` replays CUDA graphs, ``pedantic_rotating`` is the same rotation under pytest-benchmark,
``peak_memory_fwd_bwd`` a forward + backward's peak memory. ``benchmarks/README.md`` says why each choice.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[..., Any], args: Sequence[Any], device: torch.device) -> float:
    """ms of one call: CUDA device events around it (a host timer would include launch queueing), else wall time."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(times_ms)

    def q(p: float) -> float:  # linear interpolation between order statistics
        x = p * (len(s) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"median_ms": statistics.median(s), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(s)}


def time_fn(
    fn: Callable[..., Any],
    arg_sets: Sequence[Sequence[Any]],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.5,
) -> dict[str, float]:
    """Median, p10 and p90 (in ms) of ``fn(*args)`` over calls rotating through ``arg_sets``, under inference mode.

    At least ``min_runs`` timed calls, then more until ``budget_s`` of timed work or ``max_runs``.
    """
    device = torch.device(device)
    if not arg_sets:
        raise ValueError("time_fn needs at least one input set")
    with torch.inference_mode():
        for i in range(warmup):
            fn(*arg_sets[i % len(arg_sets)])
        _sync(device)
        times: list[float] = []
        while len(times) < max_runs and (len(times) < min_runs or sum(times) < budget_s * 1e3):
            times.append(_timed_call(fn, arg_sets[len(times) % len(arg_sets)], device))
    return summarize(times)


def time_interleaved(
    fns: dict[str, Callable[..., Any]],
    arg_sets: Sequence[Sequence[Any]],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.5,
    inference: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`time_fn` for several implementations, one call of each still wanting calls per round, all on the
    same input set, the order rotating each round. ``inference=False`` leaves autograd on (forward + backward).
    """
    device = torch.device(device)
    if not arg_sets:
        raise ValueError("time_interleaved needs at least one input set")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode(inference):
        for fn in fns.values():
            for i in range(warmup):
                fn(*arg_sets[i % len(arg_sets)])
        _sync(device)
        i = 0
        while True:
            want = [n for n, t in times.items() if len(t) < max_runs and (len(t) < min_runs or sum(t) < budget_s * 1e3)]
            if not want:
                break
            args = arg_sets[i % len(arg_sets)]
            # the first of a round starts in the state the previous round left (caches, freed pages, clocks):
            # measured here, the second of two CPU backward calls ran ~4% slower whichever it was
            shift = i % len(want)
            i += 1
            for name in want[shift:] + want[:shift]:
                times[name].append(_timed_call(fns[name], args, device))
    return {name: summarize(t) for name, t in times.items()}


def cuda_graphed(fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]]) -> Callable[..., Any]:
    """``fn`` captured into one CUDA graph per input set; returns ``replay(*args)``, which replays the graph of
    those very tensors and returns its output. Each set gets its own graph, so the input rotation still holds.
    Raises if ``fn`` cannot be captured (a host synchronisation)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graphed: CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(side):
        for args in arg_sets:  # warm-up outside capture: lazy init, Triton compiles, allocator growth
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = {}
    for args in arg_sets:
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            out = fn(*args)
        graphs[tuple(id(a) for a in args)] = (graph, out)

    def replay(*args):
        graph, out = graphs[tuple(id(a) for a in args)]
        graph.replay()
        return out

    return replay


def pedantic_rotating(benchmark, fn: Callable, arg_sets: Sequence[tuple], device: str | torch.device, *,
                      group: str, rounds: int = 20, warmup_rounds: int = 2, inference: bool = True,
                      **extra_info: Any) -> None:
    """Time ``fn`` with pytest-benchmark's ``benchmark`` fixture, one call per round rotating over ``arg_sets``,
    the device synchronised before each call ends. ``inference=False`` leaves autograd on."""
    calls = iter(range(10**9))

    def call():
        with torch.inference_mode(inference):
            out = fn(*arg_sets[next(calls) % len(arg_sets)])
        _sync(torch.device(device))
        return out

    benchmark.group = group
    benchmark.extra_info.update(extra_info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def peak_memory_fwd_bwd(fn: Callable[[], torch.Tensor], device: str | torch.device) -> float | None:
    """Peak allocated GiB for one forward + backward of ``fn()`` (CUDA only; None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn().float().square().mean().backward()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30
