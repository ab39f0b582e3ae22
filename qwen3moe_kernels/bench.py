"""The shared timing harness, and the embedded default benchmark (the Qwen3-30B-A3B sparse MoE block).

Every benchmark in this project times through :func:`time_fn`:

* the result is checked against the reference *before* anything is timed (a wrong kernel gets no number);
* a few warm-up calls (lazy init, Triton autotuning, allocator growth) are not timed;
* then many timed calls, rotating over several input sets so that a small op cannot keep its inputs hot in
  cache between calls (weights too large for any cache are shared, as they are in a model);
* CUDA is timed with device events around each call (host timers would include launch queueing);
* the median is reported with the 10th and 90th percentiles as the spread; the number of calls adapts to a
  time budget (at least ``min_runs``), so a 40 ms prefill and a 20 us decode call both get a stable median;
* implementations compared in one table are timed interleaved (:func:`time_interleaved`: one call of each per
  round), so a burst of load on a shared machine shows in all of them rather than in whichever ran during it.

:func:`machine_info` records what the numbers mean: CPU capability (``torch.backends.cpu.get_cpu_capability()``),
the lscpu model name and flags that matter (avx512_bf16, amx), GPU name, torch/triton/transformers versions and
the git commit. :func:`save_json` writes results with that record; :func:`plot` draws time vs token count per
implementation (matplotlib, when installed).

The block benchmark (:func:`bench_moe_block`) compares, on identical weights and inputs:
``fused`` (``qwen3moe_kernels.fused.sparse_moe_block``), ``eager`` (``qwen3moe_kernels.reference``, the
transformers eager loop re-written as the spec), transformers' own ``Qwen3MoeSparseMoeBlock`` with
``experts_implementation="eager"`` and ``"grouped_mm"`` (when transformers is installed and the mode runs here), and
that block with our registered experts (``"transformers-qwen3moe_kernels"``, what
``from_pretrained(..., experts_implementation="qwen3moe_kernels")`` runs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import dispatch, fused, reference, roofline
from .cpu import _lscpu, cpu_flags  # noqa: F401  (cpu_flags: tests patch it here)
from .tolerances import TOL, twice_torch_error_bound

# Qwen3-30B-A3B MoE layer shapes (config.json of the released checkpoint).
QWEN3_30B_A3B = {"hidden": 2048, "moe_intermediate": 768, "experts": 128, "top_k": 8}

# the MoE block benchmark's implementations; REGISTERED_EXPERTS is transformers' block with our experts
REGISTERED_EXPERTS = "transformers-qwen3moe_kernels"
MOE_BLOCK_IMPLS = ["fused", "eager", "transformers-eager", "transformers-grouped_mm", REGISTERED_EXPERTS]
# On CUDA these are also timed as CUDA-graph replays (rows named impl + GRAPHED): no host synchronisation in their
# forward. The eager loops (reference and transformers' "eager" experts) look up the experts hit on the host.
GRAPHED = "+cuda_graph"
GRAPH_IMPLS = ("fused", REGISTERED_EXPERTS, "transformers-grouped_mm")

DEFAULT_TOKENS = {"cpu": [1, 8, 64, 512], "cuda": [1, 8, 64, 512, 2048, 8192]}
QUICK_TOKENS = {"cpu": [1, 16], "cuda": [1, 64, 1024]}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


# The pytest-benchmark suites' selection (benchmarks/*.py). Here rather than in benchmarks/conftest.py so that
# the modules import it by a name no other conftest.py (tests/ has one) can shadow.


def bench_device() -> str:
    """``QWEN3MOE_BENCH_DEVICE``, default cuda when available."""
    return os.environ.get("QWEN3MOE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_tokens() -> list[int]:
    """``QWEN3MOE_BENCH_TOKENS`` (comma-separated), default the device's decode and prefill counts."""
    env = os.environ.get("QWEN3MOE_BENCH_TOKENS")
    if env:
        return [int(t) for t in env.split(",")]
    return DEFAULT_TOKENS.get(torch.device(bench_device()).type, DEFAULT_TOKENS["cuda"])


def bench_dtype() -> torch.dtype:
    """``QWEN3MOE_BENCH_DTYPE`` (bf16, fp16, fp32), default bf16 on a GPU and :func:`cpu_bench_dtype` on a CPU."""
    env = os.environ.get("QWEN3MOE_BENCH_DTYPE")
    if env:
        return DTYPES[env]
    return cpu_bench_dtype()[0] if bench_device() == "cpu" else torch.bfloat16


# ------------------------------------------------------------------------------------------ the machine


def cpu_bench_dtype() -> tuple[torch.dtype, str]:
    """The dtype a CPU benchmark should run in, and why.

    bf16 GEMMs are fast only where the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16); on an
    AVX2-only CPU oneDNN emulates them and a bf16 matmul runs at under 1 GFLOP/s, which would benchmark the
    emulation, not our kernels. ``get_cpu_capability()`` says "AVX512" for any AVX-512 CPU (with or without
    BF16), so the lscpu flags decide.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return torch.bfloat16, f"bf16: CPU capability {cap} with native {', '.join(native)}"
    return torch.float32, f"fp32: CPU capability {cap} without avx512_bf16/amx_bf16 (bf16 GEMMs would be emulated)"


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed, or broken: the record says so rather than failing the benchmark
        return None


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything needed to read a number later: CPU model and capability, GPU, versions, commit."""
    device = torch.device(device)
    lscpu = _lscpu()
    flags = cpu_flags()
    info = {
        "device": str(device),
        "cpu_model": lscpu.get("Model name") or platform.processor() or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "qwen3moe_kernels": _version("qwen3moe_kernels"),
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def device_label(info: dict[str, Any]) -> str:
    if info.get("gpu"):
        return f"{info['gpu']} (sm_{info.get('gpu_capability', '?').replace('.', '')})"
    return f"{info.get('cpu_model')} ({info.get('cpu_capability')}, {info.get('cpu_threads')} threads)"


PEAK_NOTE = ("% peak: the larger of TFLOP/s / the measured bf16 matmul rate and GB/s / the measured copy bandwidth "
             "(qwen3moe_kernels.roofline.device_peak); bf16/fp16 rows on a GPU only (no fp32 matmul rate is measured)")


def device_peak(device: str | torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """The measured device peak a row's ``frac_peak`` is taken of, or None: then no fraction is reported.

    GPU only (a shared 2-core CPU's "peak" is not a stable number). ``roofline.device_peak`` measures a bf16 matmul
    rate and the copy bandwidth; dense fp16 runs at the bf16 rate on the GPUs this targets, so bf16 and fp16 rows
    get a fraction. fp32 rows get none: no fp32 or tf32 matmul rate is measured, and against the bf16 rate an
    fp32 GEMM would look 10-15x further from its limit than it is.
    """
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return roofline.device_peak(device)


# ------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Median, p10 and p90 (in ms) of ``fn(*args)`` over calls rotating through ``arg_sets``.

    At least ``min_runs`` timed calls, then more until ``budget_s`` of timed work or ``max_runs``.
    """
    device = torch.device(device)
    n_sets = len(arg_sets)
    if n_sets == 0:
        raise ValueError("time_fn needs at least one input set")
    with torch.inference_mode():
        for i in range(warmup):
            fn(*arg_sets[i % n_sets])
        _sync(device)
        times: list[float] = []
        spent = 0.0
        i = 0
        while len(times) < max_runs and (len(times) < min_runs or spent < budget_s):
            args = arg_sets[i % n_sets]
            i += 1
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn(*args)
                ms = (time.perf_counter() - t0) * 1e3
            times.append(ms)
            spent += ms / 1e3
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
    """:func:`time_fn` for several implementations at once, their timed calls interleaved round by round.

    Each round calls every implementation that still wants calls (fewer than ``min_runs``, or under ``budget_s``
    of timed work and ``max_runs``) once on the same input set, starting one implementation further each round.
    On a shared machine a burst of load then hits all implementations alike, instead of whichever happened to be
    timed during it. The calls run under ``torch.inference_mode()``; ``inference=False`` leaves autograd on (a
    timed forward + backward).
    """
    device = torch.device(device)
    n_sets = len(arg_sets)
    if n_sets == 0:
        raise ValueError("time_interleaved needs at least one input set")
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    with torch.inference_mode(inference):
        for fn in fns.values():
            for i in range(warmup):
                fn(*arg_sets[i % n_sets])
        _sync(device)
        i = 0
        while True:
            want = [n for n in fns if len(times[n]) < max_runs and (len(times[n]) < min_runs or spent[n] < budget_s)]
            if not want:
                break
            args = arg_sets[i % n_sets]
            # the first implementation of a round starts in the state the previous round left (caches, freed
            # pages, clocks), so the order rotates: measured here, the second of two CPU backward calls ran ~4%
            # slower whichever it was
            shift = i % len(want)
            i += 1
            for name in want[shift:] + want[:shift]:
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fns[name](*args)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    fns[name](*args)
                    ms = (time.perf_counter() - t0) * 1e3
                times[name].append(ms)
                spent[name] += ms / 1e3
    return {name: summarize(t) for name, t in times.items()}


def cuda_graphed(fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]]) -> Callable[..., Any]:
    """``fn`` captured into one CUDA graph per input set; returns ``replay(*args)``, which replays the graph of
    those arguments (the very tensors of ``arg_sets``) and returns its output tensor.

    Why: a decode step of the MoE block reads ~75 MB of expert weights (Qwen3-30B-A3B, bf16), ~25 us at H100/H200
    bandwidth, while launching its ~10 kernels from Python takes longer than that; a served model replays
    captured graphs (torch.compile's "reduce-overhead", vLLM/SGLang decode), so the graph rows show what the
    kernels do and the plain rows what an eager caller pays. Each input set gets its own graph (and memory pool),
    so the rotation that keeps caches honest still holds. Raises if ``fn`` cannot be captured (a host sync)."""
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
    """Time ``fn`` with pytest-benchmark (the suites under benchmarks/), one call per round, rotating over
    ``arg_sets`` so caches do not flatter, the device synchronised before each call ends. The calls run under
    ``torch.inference_mode()``; ``inference=False`` leaves autograd on (a timed forward + backward)."""
    it = iter(range(10**9))

    def call():
        with torch.inference_mode(inference):
            out = fn(*arg_sets[next(it) % len(arg_sets)])
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return out

    benchmark.group = group
    benchmark.extra_info.update(extra_info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(times_ms)

    def q(p: float) -> float:  # linear interpolation between order statistics
        x = p * (len(s) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"median_ms": statistics.median(s), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(s)}


def peak_memory_fwd_bwd(fn: Callable[[], torch.Tensor], device: str | torch.device) -> float | None:
    """Peak allocated GiB for one forward + backward of ``fn()`` (CUDA only; None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    out.float().square().mean().backward()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


# ------------------------------------------------------------------------------------- result checks


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.float() - ref.float()).abs().max().item()


def close_bound(ref: torch.Tensor, kind: str, dtype: torch.dtype) -> float:
    """The max-abs error ``assert_close(atol, rtol)`` of the table allows against ``ref`` (worst element)."""
    atol, rtol = TOL[kind][dtype]
    return atol + rtol * (ref.float().abs().max().item() if ref.numel() else 0.0)


def close_ok(out: torch.Tensor, ref: torch.Tensor, kind: str, dtype: torch.dtype) -> bool:
    atol, rtol = TOL[kind][dtype]
    if out.shape != ref.shape:
        return False
    return bool(torch.isclose(out.float(), ref.float(), atol=atol, rtol=rtol).all()) if out.numel() else True


# ------------------------------------------------------------------------------------ tables and files


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if spec:
            return format(v, spec)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec). Missing keys print as '-'."""
    cells = [[h for _, h, _ in columns]] + [[_fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BENCH_COLUMNS = [
    ("op", "op", ""),
    ("dtype", "dtype", ""),
    ("tokens", "T", ""),
    ("impl", "impl", ""),
    ("median_ms", "median ms", ".3f"),
    ("spread", "p10-p90 ms", ""),
    ("vs_eager", "x eager", ".2f"),
    ("vs_transformers", "x transformers", ".2f"),
    ("tflops", "TFLOP/s", ".3f"),
    ("gbps", "GB/s", ".1f"),
    ("frac_peak", "% peak", ".1f"),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("peak_mem_gib", "fwd+bwd GiB", ".2f"),
    ("ran", "ran", ""),
]


def bench_table(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        row = dict(r)
        if r.get("p10_ms") is not None and r.get("p90_ms") is not None:
            row["spread"] = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        if r.get("error"):
            row["ran"] = f"{r.get('ran') or ''} ERROR: {r['error']}".strip()
        rows.append(row)
    cols = [c for c in BENCH_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    return format_table(rows, cols)


def save_json(path: str | Path, results: Sequence[dict[str, Any]], machine: dict[str, Any], config: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "config": config, "results": list(results)}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Median time vs token count, one line per implementation, one panel per (op, dtype). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib, or '.[bench]')")
        return None
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float, float, float]]]] = {}
    for r in results:
        if r.get("median_ms") is None or r.get("tokens") is None:
            continue
        key = (r.get("op", "?"), r.get("dtype", "?"))
        panels.setdefault(key, {}).setdefault(r.get("impl", "?"), []).append(
            (int(r["tokens"]), r["median_ms"], r.get("p10_ms", r["median_ms"]), r.get("p90_ms", r["median_ms"]))
        )
    if not panels:
        print("no timed results to plot")
        return None
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, ((op, dt), impls) in zip(axes.flat, sorted(panels.items())):
        for impl, pts in sorted(impls.items()):
            pts.sort()
            t = [p[0] for p in pts]
            ax.plot(t, [p[1] for p in pts], marker="o", label=impl)
            ax.fill_between(t, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("median ms (band: p10-p90)")
        ax.set_title(f"{op} ({dt})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_ratios(results: list[dict[str, Any]], baseline: str = "eager", transformers: str | None = None) -> None:
    """Fill ``vs_eager`` / ``vs_transformers`` = baseline time / this time (>1 means faster), per (op, dtype, T).

    ``transformers`` names the transformers implementation to compare with; by default the fastest row whose
    impl starts with "transformers" in the same group (the best transformers can do here).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("op"), r.get("dtype"), r.get("tokens")), []).append(r)
    for rows in groups.values():
        timed = [r for r in rows if r.get("median_ms")]
        base = next((r for r in timed if r.get("impl") == baseline), None)
        # transformers' own implementations only (not a transformers model patched with ours)
        hf = [r for r in timed if str(r.get("impl", "")).startswith("transformers") and "qwen3moe" not in r["impl"]]
        if transformers is not None:
            hf = [r for r in hf if r.get("impl") == transformers]
        hf_best = min(hf, key=lambda r: r["median_ms"]) if hf else None
        for r in timed:
            if base is not None and r.get("vs_eager") is None:
                r["vs_eager"] = base["median_ms"] / r["median_ms"]
            if hf_best is not None and r.get("vs_transformers") is None:
                r["vs_transformers"] = hf_best["median_ms"] / r["median_ms"]
                r.setdefault("transformers_baseline", hf_best["impl"])


def add_rates(r: dict[str, Any], flops: float | None, nbytes: float | None, peak: dict | None) -> None:
    """TFLOP/s and GB/s from the median, and the fraction of the device peak of whichever bound is nearer."""
    ms = r.get("median_ms")
    if not ms:
        return
    if flops:
        r["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes:
        r["gbps"] = nbytes / (ms * 1e-3) / 1e9
    if peak:
        fracs = []
        if flops and peak.get("tflops"):
            fracs.append(r["tflops"] / peak["tflops"])
        if nbytes and peak.get("gbps"):
            fracs.append(r["gbps"] / peak["gbps"])
        if fracs:
            r["frac_peak"] = 100.0 * max(fracs)


def last_implementations(prefixes: Sequence[str] | None = None) -> str:
    """What ``qwen3moe_kernels.implementations()`` says ran, as one short string."""
    impls = dispatch.implementations()
    if prefixes is not None:
        impls = {k: v for k, v in impls.items() if any(k.startswith(p) for p in prefixes)}
    return ", ".join(f"{k}={v}" for k, v in sorted(impls.items())) or "-"


# --------------------------------------------------------------------------------- the MoE block bench


def make_moe_weights(
    hidden: int, inter: int, experts: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded random weights scaled like a trained layer (unit-variance activations in, O(1) out)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        # generated in chunks along dim 0 so a 1.2 GB bf16 tensor never needs a 2.4 GB fp32 twin
        out = torch.empty(shape, dtype=dtype, device=device)
        for i in range(0, shape[0], 8):
            out[i : i + 8] = (torch.randn((min(8, shape[0] - i), *shape[1:]), generator=g) * scale).to(dtype)
        return out

    return {
        "router_weight": rnd(experts, hidden, scale=hidden**-0.5),
        "w_gate_up": rnd(experts, 2 * inter, hidden, scale=hidden**-0.5),
        "w_down": rnd(experts, hidden, inter, scale=inter**-0.5),
    }


def moe_block_cost(T: int, shapes: dict[str, int],
                   dtype: torch.dtype) -> tuple[float | None, float | None, str | None]:
    """(FLOPs, bytes, roofline model name) of one sparse block call, from ``roofline.op_cost("moe_block", ...)``:
    the project's one cost model (router, top-k, permute, experts, combine; the experts hit in expectation under
    uniform routing). Shapes that are no model of ``roofline.MODELS`` (``--quick``'s 16 experts) get None: no
    rates, rather than a second cost model."""
    want = (shapes["hidden"], shapes["moe_intermediate"], shapes["experts"], shapes["top_k"])
    for name, m in roofline.MODELS.items():
        if (m["hidden"], m["inter"], m["experts"], m["top_k"]) == want:
            flops, nbytes = roofline.op_cost("moe_block", name, T, dtype_name(dtype))
            return flops, nbytes, name
    return None, None, None


def transformers_block(weights: dict[str, torch.Tensor], top_k: int, experts_implementation: str):
    """transformers' ``Qwen3MoeSparseMoeBlock`` sharing ``weights`` (built on the meta device: no copy)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, two_i, H = weights["w_gate_up"].shape
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E, num_experts_per_tok=top_k,
                         norm_topk_prob=True, experts_implementation=experts_implementation)
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(cfg)
    block.gate.weight = torch.nn.Parameter(weights["router_weight"], requires_grad=False)
    block.experts.gate_up_proj = torch.nn.Parameter(weights["w_gate_up"], requires_grad=False)
    block.experts.down_proj = torch.nn.Parameter(weights["w_down"], requires_grad=False)
    return block.eval()


def router_tied_tokens(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens whose k-th and (k+1)-th router probabilities are equal: any choice between them is correct.

    bf16 logits carry 8 significant bits, so at prefill sizes some tokens tie at the top-k boundary; the spec
    breaks ties by the lowest expert id, ``torch.topk`` (transformers) by whatever its kernel does.
    """
    probs = torch.softmax(torch.nn.functional.linear(x, router_weight).float(), dim=-1)
    if top_k >= probs.shape[-1]:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    top = torch.topk(probs, top_k + 1, dim=-1).values
    return top[:, top_k - 1] == top[:, top_k]


def check_moe_block(out: torch.Tensor, x: torch.Tensor, weights: dict, top_k: int,
                    ref_lowp: torch.Tensor) -> tuple[float, float, bool]:
    """(max error, allowed, ok) of a block output against an fp32 experts reference on the same routing.

    fp32: the table's "gemm" tolerance against the reference. bf16/fp16: the flash-attention rule, at most twice
    the error of PyTorch's own low-precision computation (``ref_lowp``, the reference in x.dtype). The routing is
    the low-precision router's in both: an fp32 router would flip near-tied experts and measure only that.
    Tokens tied at the top-k boundary (:func:`router_tied_tokens`) are left out of the comparison.
    """
    if out.shape != ref_lowp.shape:
        return float("inf"), 0.0, False
    keep = ~router_tied_tokens(x, weights["router_weight"], top_k)
    if x.dtype == torch.float32:
        o, r = out[keep], ref_lowp[keep]
        return max_abs_err(o, r), close_bound(r, "gemm", x.dtype), close_ok(o, r, "gemm", x.dtype)
    logits = torch.nn.functional.linear(x, weights["router_weight"])
    w, ids = reference.router_topk(logits, top_k, True)
    ref32 = _experts_fp32_by_chunks(x, ids, w, weights)[keep]
    err = max_abs_err(out[keep], ref32)
    bound = twice_torch_error_bound(ref32, ref_lowp[keep])
    return err, bound, bool(err <= bound)


def _experts_fp32_by_chunks(x, ids, w, weights):
    """fp32 experts reference without an fp32 copy of all 128 experts at once (only the experts hit, one by one)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    w = w.to(x.dtype).float()
    idl = ids.long()
    for e in torch.unique(idl).tolist():
        tok, ch = torch.where(idl == e)
        h = reference.swiglu(torch.nn.functional.linear(x[tok].float(), weights["w_gate_up"][e].float()))
        out.index_add_(0, tok, torch.nn.functional.linear(h, weights["w_down"][e].float()) * w[tok, ch, None])
    return out


def bench_moe_block(
    device: str | torch.device = "cpu",
    token_counts: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    shapes: dict[str, int] | None = None,
    impls: Sequence[str] | None = None,
    n_inputs: int = 3,
    budget_s: float = 1.5,
    min_runs: int = 5,
    memory: bool = True,
    graphs: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Time the sparse MoE block per implementation and token count. Returns one dict per (T, impl).

    ``impls`` from: "fused", "eager", "transformers-eager", "transformers-grouped_mm" and
    "transformers-qwen3moe_kernels" (transformers' block with ``experts_implementation="qwen3moe_kernels"`` after
    ``integrations.transformers.register()``: its router, our experts). Default: all that run here. On CUDA
    (``graphs``) the implementations of ``GRAPH_IMPLS`` are also timed as CUDA-graph replays (``cuda_graphed``),
    in rows named ``impl + "+cuda_graph"``, their output checked like the others before timing.
    """
    device = torch.device(device)
    shapes = dict(QWEN3_30B_A3B, **(shapes or {}))
    H, I, E, k = shapes["hidden"], shapes["moe_intermediate"], shapes["experts"], shapes["top_k"]
    if dtype is None:
        dtype = cpu_bench_dtype()[0] if device.type == "cpu" else torch.bfloat16
    if token_counts is None:
        token_counts = DEFAULT_TOKENS.get(device.type, DEFAULT_TOKENS["cuda"])
    wanted = list(impls or MOE_BLOCK_IMPLS)
    weights = make_moe_weights(H, I, E, dtype, device)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        if name == "fused":
            fns[name] = lambda x: fused.sparse_moe_block(x, weights["router_weight"], weights["w_gate_up"],
                                                         weights["w_down"], k, True)[0]
        elif name == "eager":
            fns[name] = lambda x: reference.sparse_moe_block(x, weights["router_weight"], weights["w_gate_up"],
                                                             weights["w_down"], k, True)[0]
        elif name.startswith("transformers-") or name == REGISTERED_EXPERTS:
            mode = name.split("-", 1)[1] if name != REGISTERED_EXPERTS else None
            try:
                if mode is None:  # transformers' block with our registered experts implementation
                    from .integrations.transformers import register

                    mode = register()
                block = transformers_block(weights, k, mode)
            except Exception as exc:  # transformers missing, or this mode not available here
                skipped[name] = f"{type(exc).__name__}: {exc}"
                continue
            fns[name] = lambda x, block=block: block(x[None])[0]
        else:
            raise ValueError(f"unknown MoE block implementation {name!r}")
    for name, why in skipped.items():
        if log:
            log(f"moe_block: skipping {name}: {why}")
    peak = device_peak(device, dtype)
    results: list[dict[str, Any]] = []
    g = torch.Generator(device="cpu").manual_seed(1234)
    for T in token_counts:
        xs = [torch.randn(T, H, generator=g).to(device=device, dtype=dtype) for _ in range(n_inputs)]
        with torch.inference_mode():
            ref = reference.sparse_moe_block(xs[0], weights["router_weight"], weights["w_gate_up"], weights["w_down"],
                                             k, True)[0]
            ids = reference.router_topk(torch.nn.functional.linear(xs[0], weights["router_weight"]), k, True)[1]
            tied = int(router_tied_tokens(xs[0], weights["router_weight"], k).sum())
        active = int(torch.unique(ids).numel())
        flops, nbytes, cost_model = moe_block_cost(T, shapes, dtype)
        rows: dict[str, dict[str, Any]] = {}
        for name, fn in fns.items():  # 1. check every implementation (a wrong one gets no number)
            row: dict[str, Any] = {"op": "moe_block", "impl": name, "tokens": T, "dtype": dtype_name(dtype),
                                   "shape": f"H={H} I={I} E={E} k={k}", "device": str(device),
                                   "flops": flops, "bytes": nbytes, "cost_model": cost_model,
                                   "active_experts": active, "router_tied_tokens": tied}
            rows[name] = row
            try:
                dispatch.reset()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", dispatch.FallbackWarning)
                    with torch.inference_mode():
                        out = fn(xs[0])
                    err, bound, ok = check_moe_block(out, xs[0], weights, k, ref)
                row.update(max_err=err, tol=bound, check="pass" if ok else "FAIL")
                if name in ("fused", REGISTERED_EXPERTS):
                    row["ran"] = last_implementations()
                if not ok:
                    row["error"] = f"wrong result: max error {err:.3e} > {bound:.3e}; not timed"
            except Exception as exc:  # one broken implementation must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"
        ok_fns = {name: fns[name] for name, row in rows.items() if "error" not in row}
        if graphs and device.type == "cuda":  # 1b. the graph-captured variants, checked the same way
            for name in [n for n in GRAPH_IMPLS if n in ok_fns]:
                row = dict(rows[name], impl=name + GRAPHED)
                row.pop("max_err", None)
                rows[name + GRAPHED] = row
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", dispatch.FallbackWarning)
                        replay = cuda_graphed(fns[name], [(x,) for x in xs])
                        err, bound, ok = check_moe_block(replay(xs[0]), xs[0], weights, k, ref)
                    row.update(max_err=err, tol=bound, check="pass" if ok else "FAIL")
                    if ok:
                        ok_fns[name + GRAPHED] = replay
                    else:
                        row["error"] = f"wrong result: max error {err:.3e} > {bound:.3e}; not timed"
                except Exception as exc:
                    row["error"] = f"not capturable: {type(exc).__name__}: {exc}"
        # 2. time the correct ones, interleaved: load changes on a shared machine hit all of them alike
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", dispatch.FallbackWarning)
                timed = time_interleaved(ok_fns, [(x,) for x in xs], device, budget_s=budget_s, min_runs=min_runs)
        except Exception as exc:
            timed = {}
            for name in ok_fns:
                rows[name]["error"] = f"timing failed: {type(exc).__name__}: {exc}"
        for name, stats in timed.items():
            row = rows[name]
            row.update(stats)
            add_rates(row, flops, nbytes, peak)
            if memory and device.type == "cuda" and not name.endswith(GRAPHED):
                row["peak_mem_gib"] = _block_fwd_bwd_memory(name, weights, k, xs[0], device)
        for name, row in rows.items():
            results.append(row)
            if log:
                msg = f"  moe_block T={T:<5} {name:<30} "
                msg += f"{row['median_ms']:.3f} ms" if row.get("median_ms") else row.get("error", "")
                log(msg)
    add_ratios(results)
    return results


def _block_fwd_bwd_memory(name: str, weights: dict, k: int, x: torch.Tensor, device) -> float | None:
    """Forward + backward peak memory of the block with trainable weights (a training step's footprint)."""
    w = {n: t.detach().requires_grad_(True) for n, t in weights.items()}
    xg = x.detach().requires_grad_(True)
    if name == "fused":
        fn = lambda: fused.sparse_moe_block(xg, w["router_weight"], w["w_gate_up"], w["w_down"], k, True)[0]  # noqa: E731
    elif name == "eager":
        fn = lambda: reference.sparse_moe_block(xg, w["router_weight"], w["w_gate_up"], w["w_down"], k, True)[0]  # noqa: E731
    else:
        mode = "qwen3moe_kernels" if name == REGISTERED_EXPERTS else name.split("-", 1)[1]
        block = transformers_block(weights, k, mode)
        for p in block.parameters():
            p.requires_grad_(True)
        fn = lambda: block(xg[None])[0]  # noqa: E731
    try:
        return peak_memory_fwd_bwd(fn, device)
    except Exception:  # no backward for this path: the table shows '-'
        return None
