"""The one-command GPU run: build, test, benchmark and measure on the GPU of the day, in under 10 minutes.

    python -m qwen3moe_kernels.tools.gpu_run [--budget 570] [--no-build] [--out-dir benchmarks/results] [--copy-to DIR]

Run from the repository root (it may start before the extension is built: it builds it). Steps: build for this
GPU's arch, compile-check that arch, the test suite, the device's matmul rate and copy bandwidth,
``qwen3moe-kernels check`` and ``bench``; each in its own process group with a time limit cut from the budget.
Writes ``benchmarks/results/gpu_<device>_<UTC time>.json``; exits 0 when every step passed, 2 without a GPU.
The steps, the budget and the result file: docs/gpu_verification.md ("The GPU run").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root (this file is qwen3moe_kernels/tools/)
PY = sys.executable

# What CI tests with: .ci/run installs torch==2.14.1 (which brings triton 3.8) on Python 3.11. Versions are
# compared by prefix ("2.14.1+cu130" matches "2.14.1").
PINNED = {"python": "3.11", "torch": "2.14.1", "triton": "3.8"}

# CPU-only tests that compile every kernel for sm_90 and sm_100 (minutes): step 3 already does it for this GPU.
CPU_ONLY_TESTS = (
    "tests/test_compile_check.py::test_compile_check_all_shipped_kernels",
    "tests/test_compile_check.py::test_compile_check_json_is_current",
    "tests/test_compile_check.py::test_main_leaves_the_interpreter",
)


NO_TIME = "no time left in the budget"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (it was started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Runner:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget = budget_s
        self.steps: list[dict] = []
        self.outputs: dict[str, str] = {}  # step name -> its whole output (stdout and stderr interleaved)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def skip(self, name: str, reason: str) -> dict:
        step = {"step": name, "status": "skipped", "reason": reason}
        print(f"[gpu_run] {name}: skipped ({reason})", flush=True)
        self.steps.append(step)
        return step

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None, reserve_s: float = 0.0) -> dict:
        """Run one step with limit min(limit_s, time left - reserve_s); record rc, seconds and the output tail.

        The step runs in its own session (process group); on its time limit the whole group is killed, so a
        grandchild (ninja, nvcc, a test's worker) can neither outlive it nor hold its output pipe open."""
        limit = min(limit_s, self.left() - reserve_s)
        if limit < 5:
            return self.skip(name, NO_TIME)
        step = {"step": name, "cmd": " ".join(cmd), "limit_s": round(limit, 1)}
        print(f"[gpu_run] {name}: {step['cmd']} (limit {limit:.0f} s)", flush=True)
        t = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
            step["status"] = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=10)  # what it printed before the kill
            except subprocess.TimeoutExpired as exc:  # a process that left the group still holds the pipe
                proc.stdout.close()
                out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else (exc.output or "")
            rc = None
            step["status"] = "timed out"
        out = out or ""
        self.outputs[name] = out
        step.update(rc=rc, seconds=round(time.monotonic() - t, 1), output_tail=out[-4000:])
        print(f"[gpu_run] {name}: {step['status']} in {step['seconds']} s", flush=True)
        if step["status"] != "ok":
            print(out[-2000:], flush=True)
        self.steps.append(step)
        return step


COMPILE_CHECK_ARCHS = (90, 100)


def compile_check_cmd(arch: int) -> list[str]:
    """compile-check for this GPU's arch alone: the library was built for it only, and a check of the other arch
    would fail on the device code the build left out."""
    return [PY, "-m", "qwen3moe_kernels.tools.compile_check", "--no-json", "--jobs", "8", "--arch", str(arch)]


def pytest_cmd(junit: Path, extra: list[str]) -> list[str]:
    """The test suite less CPU_ONLY_TESTS, one line per test (-v: what pytest_progress reads after a timeout)."""
    deselect = [f"--deselect={t}" for t in CPU_ONLY_TESTS]
    return [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests", f"--junitxml={junit}", *deselect, *extra]


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


def version_warnings(env: dict) -> list[str]:
    """One line per python/torch/triton version that differs from PINNED (the run goes on regardless)."""
    out = []
    for name, want in PINNED.items():
        got = env.get(name)
        if not str(got or "").startswith(want):
            out.append(f"{name} {got} here, the repository is tested with {want}: failures may come from the "
                       f"version (e.g. the interpreter bf16 shim in tests/triton_interp.py relies on Triton 3.8 "
                       f"internals), not from the code")
    return out


def cuda_arch(capability: str | None) -> int | None:
    """"9.0" -> 90."""
    if not capability:
        return None
    major, minor = capability.split(".")
    return int(major) * 10 + int(minor)


_PYTEST_LINE = re.compile(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)", re.M)
_RANK = {"PASSED": 0, "XFAIL": 0, "XPASS": 0, "SKIPPED": 1, "FAILED": 2, "ERROR": 3}


def pytest_progress(text: str) -> dict:
    """Test results from ``pytest -v`` output, as far as it got (a run killed on its time limit, or crashed,
    writes no JUnit XML): the same keys as :func:`junit_summary`, plus ``partial``. A test listed twice (a
    teardown error after a pass) keeps its worse outcome."""
    outcome: dict[str, str] = {}
    for node, what in _PYTEST_LINE.findall(text):
        if node not in outcome or _RANK[what] > _RANK[outcome[node]]:
            outcome[node] = what
    vals = list(outcome.values())
    return {"tests": len(vals), "failures": vals.count("FAILED"), "errors": vals.count("ERROR"),
            "skipped": vals.count("SKIPPED"),
            "failed": [n for n, w in outcome.items() if w in ("FAILED", "ERROR")][:100],
            "skipped_names": [n for n, w in outcome.items() if w == "SKIPPED"][:100],
            "partial": True, "source": "pytest -v lines printed before pytest stopped (timed out or crashed: "
                                        "no JUnit XML)"}


def junit_summary(path: Path) -> dict:
    """Counts and failed/skipped test names from pytest's JUnit XML ({} if missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    s = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    s["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None][:100]
    s["skipped_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                          if c.find("skipped") is not None][:100]
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen3moe_kernels.tools.gpu_run", description=__doc__.split("\n\n")[0])
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
    print(f"[gpu_run] {env.get('gpu')} (sm {env.get('capability')}), driver {env.get('driver')}, python "
          f"{env['python']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}", flush=True)
    warnings = version_warnings(env)
    for w in warnings:
        print(f"[gpu_run] WARNING: {w}", flush=True)
    arch = cuda_arch(env.get("capability"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dev = re.sub(r"[^A-Za-z0-9]+", "_", env.get("gpu") or "gpu").strip("_")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"gpu_{dev}_{stamp}.json"
    bench_path = out_dir / f"bench_{dev}_{stamp}.json"
    junit = out_dir / f".gpu_run_junit_{stamp}.xml"

    if not a.no_build:  # this GPU's arch only ("9.0a": wgmma needs the arch-specific target)
        arch_list = env["capability"] + ("a" if arch in (90, 100) else "")
        r.run("build", [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 300,
              env={"TORCH_CUDA_ARCH_LIST": arch_list, "MAX_JOBS": str(os.cpu_count() or 4),
                   "NVCC_THREADS": "2"}, reserve_s=240)
    r.run("extension loads with CUDA kernels",
          [PY, "-c", "from qwen3moe_kernels import _ext; import sys; print('available', _ext.AVAILABLE, "
                     "'with_cuda', _ext.WITH_CUDA, _ext.IMPORT_ERROR); sys.exit(0 if _ext.WITH_CUDA else 1)"], 60)
    if arch in COMPILE_CHECK_ARCHS:
        r.run("compile-check", compile_check_cmd(arch), 120, env={"QWEN3MOE_REQUIRE_CUDA_BUILD": "1"},
              reserve_s=200)
    else:
        r.skip("compile-check", f"sm_{arch} is not a compile-check target (sm_90, sm_100)")
    step = r.run("pytest", pytest_cmd(junit, a.pytest_args.split()), 240, reserve_s=150)
    tests = junit_summary(junit)
    if not tests and step.get("status") != "skipped":
        tests = pytest_progress(r.outputs.get("pytest", ""))
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
        "what": ("qwen3moe_kernels.tools.gpu_run: build, tests, compile-check, measured device limits, check and bench "
                 "on a GPU"),
        "environment": env,
        "budget_s": a.budget,
        "total_s": round(time.monotonic() - r.t0, 1),
        "ok": all(s["status"] == "ok" or (s["status"] == "skipped" and s["reason"] != NO_TIME) for s in r.steps),
        "warnings": warnings,
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
        print(f"tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
              + (" (partial: pytest stopped before writing its JUnit XML)" if tests.get("partial") else ""))
    for w in warnings:
        print(f"WARNING: {w}")
    if peaks:
        print(f"measured limits: {peaks['tflops']:.0f} TFLOP/s bf16, {peaks['gbps']:.0f} GB/s")
    print(f"total {report['total_s']} s of {a.budget:.0f} s budget; {'OK' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
