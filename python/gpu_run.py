#!/usr/bin/env python3
"""The one-command GPU run: build, test, benchmark and measure on the GPU of the day, in under 10 minutes.

    python python/gpu_run.py [--budget 570] [--no-build] [--out-dir benchmarks/results] [--copy-to DIR]

Steps, each in a subprocess with its own time limit cut to what is left of the overall budget (a step that runs
out is recorded as timed out and the run goes on, so the JSON is always written):

1. environment: GPU name, capability, SM count, memory, driver (nvidia-smi), torch/triton/CUDA/nvcc versions,
   git commit and whether the tree is dirty;
2. build the extension for this GPU's arch (``pip install --no-build-isolation --no-deps -e .`` with
   ``TORCH_CUDA_ARCH_LIST`` set to e.g. ``9.0a``; ``MAX_JOBS`` = CPU count), then check that its CUDA kernels load;
3. ``qwen3moe-kernels compile-check`` against the freshly built library (sm_90a/sm_100a device code);
4. the test suite (``pytest tests``: every CUDA and Triton test runs for real on the GPU), as JUnit XML;
5. the device limits: bf16 matmul rate and copy bandwidth (:func:`qwen3moe_kernels.roofline.measure_peaks`);
6. ``qwen3moe-kernels check --device cuda`` and ``qwen3moe-kernels bench --device cuda`` (which reports each
   result as a fraction of the measured limits).

Writes ``benchmarks/results/gpu_<device>_<UTC date-time>.json`` holding every step's status, time and output
tail, the test counts and failures, the measured peaks, the roofline floors at those peaks and the bench rows
(the bench's own JSON is saved beside it). ``--copy-to`` copies the files there too (for a machine that is given
back after the run). Exit status: 0 when every step passed.

Budget on one H100 (16 CPUs): build ~3 min, tests ~2-3 min, peaks ~10 s, check + bench ~2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class Runner:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget = budget_s
        self.steps: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None, reserve_s: float = 0.0) -> dict:
        """Run one step with limit min(limit_s, time left - reserve_s); record rc, seconds and the output tail."""
        limit = min(limit_s, self.left() - reserve_s)
        step = {"step": name, "cmd": " ".join(cmd), "limit_s": round(limit, 1)}
        if limit < 5:
            step.update(status="skipped", reason="no time left in the budget")
            print(f"[gpu_run] {name}: skipped (no time left)", flush=True)
            self.steps.append(step)
            return step
        print(f"[gpu_run] {name}: {step['cmd']} (limit {limit:.0f} s)", flush=True)
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                               timeout=limit)
            out, rc = p.stdout + p.stderr, p.returncode
            step["status"] = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            rc = None
            step["status"] = "timed out"
        step.update(rc=rc, seconds=round(time.monotonic() - t, 1), output_tail=out[-4000:])
        print(f"[gpu_run] {name}: {step['status']} in {step['seconds']} s", flush=True)
        if step["status"] != "ok":
            print(out[-2000:], flush=True)
        self.steps.append(step)
        return step


def _sh(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict:
    import torch

    env = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _sh(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        "nvidia_smi": _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                           "--format=csv,noheader"]),
        "nvcc": _sh(["nvcc", "--version"]),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    if env["nvidia_smi"]:
        parts = [s.strip() for s in env["nvidia_smi"].splitlines()[0].split(",")]
        env["driver"] = parts[1] if len(parts) > 1 else None
    if env["nvcc"]:
        m = re.search(r"release ([\d.]+)", env["nvcc"])
        env["nvcc"] = m.group(1) if m else env["nvcc"][-80:]
    return env


def junit_summary(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    s = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    s["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None][:100]
    s["skipped_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                          if c.find("skipped") is not None][:100]
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=570.0, help="overall seconds (default 570: inside 10 minutes)")
    ap.add_argument("--no-build", action="store_true", help="use the extension already built")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--copy-to", help="also copy the result files here")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (e.g. '-k cuda')")
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_run: no CUDA device visible to torch; nothing to do here (the CPU suite is `pytest tests`)")
        return 2
    r = Runner(a.budget)
    env = environment()
    print(f"[gpu_run] {env.get('gpu')} (sm {env.get('capability')}), driver {env.get('driver')}, torch "
          f"{env['torch']}, triton {env['triton']}, commit {env['git_commit']}", flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dev = re.sub(r"[^A-Za-z0-9]+", "_", env.get("gpu") or "gpu").strip("_")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"gpu_{dev}_{stamp}.json"
    bench_path = out_dir / f"bench_{dev}_{stamp}.json"
    junit = out_dir / f".gpu_run_junit_{stamp}.xml"

    if not a.no_build:
        arch = env["capability"] + ("a" if env["capability"] in ("9.0", "10.0") else "")
        r.run("build", [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 300,
              env={"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
                   "NVCC_THREADS": "2"}, reserve_s=240)
    r.run("extension loads with CUDA kernels",
          [PY, "-c", "from qwen3moe_kernels import _ext; import sys; print('available', _ext.AVAILABLE, "
                     "'with_cuda', _ext.WITH_CUDA, _ext.IMPORT_ERROR); sys.exit(0 if _ext.WITH_CUDA else 1)"], 60)
    r.run("compile-check", [PY, "-m", "qwen3moe_kernels.compile_check", "--no-json", "--jobs", "8"], 120,
          reserve_s=200)
    r.run("pytest", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                     f"--junitxml={junit}", *a.pytest_args.split()], 240, reserve_s=150)
    tests = junit_summary(junit)
    junit.unlink(missing_ok=True)

    peaks = None
    step = r.run("device peaks", [PY, "-c", "import json; from qwen3moe_kernels import roofline; "
                                            "print('PEAKS', json.dumps(roofline.measure_peaks('cuda')))"], 90,
                 reserve_s=60)
    m = re.search(r"PEAKS (\{.*\})", step.get("output_tail", ""))
    if m:
        peaks = json.loads(m.group(1))
    r.run("check", [PY, "-m", "qwen3moe_kernels.cli", "check", "--device", "cuda"], 90, reserve_s=60)
    r.run("bench", [PY, "-m", "qwen3moe_kernels.cli", "bench", "--device", "cuda", "--out", str(bench_path),
                    "--no-plot", "--budget", "0.5"], 200, reserve_s=5)

    from qwen3moe_kernels import roofline

    bench_rows = None
    if bench_path.exists():
        try:
            bench_rows = json.loads(bench_path.read_text())
        except ValueError:
            bench_rows = None
    report = {
        "what": "python/gpu_run.py: build, tests, compile-check, measured device limits, check and bench on a GPU",
        "environment": env,
        "budget_s": a.budget,
        "total_s": round(time.monotonic() - r.t0, 1),
        "ok": all(s["status"] == "ok" for s in r.steps),
        "steps": r.steps,
        "tests": tests,
        "measured_peaks": peaks,
        "roofline_floors_at_measured_peaks (limits, not results)":
            roofline.floors(peak=peaks) if peaks else None,
        "bench_json": bench_path.name if bench_path.exists() else None,
        "bench": bench_rows,
    }
    result_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\n[gpu_run] wrote {result_path}")
    if a.copy_to:
        Path(a.copy_to).mkdir(parents=True, exist_ok=True)
        for p in (result_path, bench_path):
            if p.exists():
                shutil.copy(p, a.copy_to)
    print(f"{'step':36} {'status':10} {'seconds':>8}")
    for s in r.steps:
        print(f"{s['step']:36} {s['status']:10} {s.get('seconds', '-'):>8}")
    if tests:
        print(f"tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped")
    if peaks:
        print(f"measured limits: {peaks['tflops']:.0f} TFLOP/s bf16, {peaks['gbps']:.0f} GB/s")
    print(f"total {report['total_s']} s of {a.budget:.0f} s budget; {'OK' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
