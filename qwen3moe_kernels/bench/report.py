"""Benchmark rows out: ratios and rates added to them, the table printed, JSON and a PNG plot saved.

A row is a dict with ``op``, ``impl``, ``tokens``, ``dtype`` and the timing (``median_ms``, ``p10_ms``,
``p90_ms``, ``runs``), or an ``error``. ``save_json`` writes rows with the machine record; ``plot`` draws median
time vs token count per implementation, one panel per (op, dtype).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import recorder
from .machine import dtype_name

PEAK_NOTE = ("% peak: the larger of TFLOP/s / the measured bf16 matmul rate and GB/s / the measured copy bandwidth "
             "(qwen3moe_kernels.roofline.device_peak); bf16/fp16 rows on a GPU only (no fp32 matmul rate is measured)")

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
    ("weight_gbps", "weight GB/s", ".1f"),
    ("frac_read_bw", "% read BW", ".1f"),
    ("frac_mm", "% mm rate", ".1f"),
    ("frac_peak", "% peak", ".1f"),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("peak_mem_gib", "fwd+bwd GiB", ".2f"),
    ("ran", "ran", ""),
]


def op_row(op: str, impl: str, tokens: int, dtype: torch.dtype, info: dict[str, Any], timing: dict[str, float],
           **extra: Any) -> dict[str, Any]:
    """One op benchmark row: what ran, its timing and where (from :func:`machine.machine_info`)."""
    return {"op": op, "impl": impl, "tokens": tokens, "dtype": dtype_name(dtype), **timing, "device": info["device"],
            "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"], "gpu": info["gpu"], **extra}


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


def last_implementations(prefixes: Sequence[str] | None = None) -> str:
    """What ``qwen3moe_kernels.implementations()`` says ran, as one short string."""
    impls = recorder.implementations()
    if prefixes is not None:
        impls = {k: v for k, v in impls.items() if any(k.startswith(p) for p in prefixes)}
    return ", ".join(f"{k}={v}" for k, v in sorted(impls.items())) or "-"


# ------------------------------------------------------------------------------------------- output


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


def bench_table(results: Sequence[dict[str, Any]]) -> str:
    """The rows under :data:`BENCH_COLUMNS` (columns no row fills are left out), errors in the last column."""
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
        if r.get("median_ms") is None or r.get("tokens") is None or r.get("op") == "cpu_limit":
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
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5.5 * cols, 4.2 * math.ceil(n / cols)),
                             squeeze=False)
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
