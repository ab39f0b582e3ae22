"""What a benchmark runs on and in: the machine record saved beside every number, the dtype and device choice.

``machine_info`` records CPU model, capability and the flags that matter, the CPU experts' ISA path, GPU, versions
and the git commit; ``device_peak`` / ``copy_bandwidth`` are the measured GPU limits that rows report a fraction of,
``cpu_read_probe`` / ``cpu_mm_probe`` the CPU's, measured in the same run as the rows (docs/ops/grouped_swiglu.md).
The ``QWEN3MOE_BENCH_*`` selectors are read by the pytest-benchmark suites in ``benchmarks/``.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from .. import _ext, roofline
from ..cpu import _lscpu, cpu_flags  # cpu_flags is looked up here at call time: tests patch it

# decode and prefill token counts per device type
DEFAULT_TOKENS = {"cpu": [1, 8, 64, 512], "cuda": [1, 8, 64, 512, 2048, 8192]}
QUICK_TOKENS = {"cpu": [1, 16], "cuda": [1, 64, 1024]}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def cpu_bench_dtype() -> tuple[torch.dtype, str]:
    """The dtype a CPU benchmark runs in, and why: bf16 only where the CPU has native bf16 dot products.

    An AVX2-only CPU emulates bf16 GEMMs at under 1 GFLOP/s (that would time the emulation, not our kernels), and
    ``get_cpu_capability()`` says "AVX512" with or without BF16, so lscpu's flags decide.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if native:
        return torch.bfloat16, f"bf16: CPU capability {cap} with native {', '.join(native)}"
    return torch.float32, f"fp32: CPU capability {cap} without avx512_bf16/amx_bf16 (bf16 GEMMs would be emulated)"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU, :func:`cpu_bench_dtype` on a CPU."""
    return cpu_bench_dtype()[0] if torch.device(device).type == "cpu" else torch.bfloat16


def impl_name(device: str | torch.device) -> str:
    """The row name of our kernels on ``device`` ("cuda" or "cpu"), beside "eager" and "transformers"."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


# --------------------------------------------------------------- the pytest-benchmark suites' selection
# Here rather than in benchmarks/conftest.py: the suites import them by a name no other conftest.py can shadow.


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
    """``QWEN3MOE_BENCH_DTYPE`` (bf16, fp16, fp32), default :func:`default_dtype` of the bench device."""
    env = os.environ.get("QWEN3MOE_BENCH_DTYPE")
    return DTYPES[env] if env else default_dtype(bench_device())


# ---------------------------------------------------------------------------------------- the record


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
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
    info = {
        "device": str(device),
        "cpu_model": _lscpu().get("Model name") or platform.processor() or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}),
        "cpu_threads": torch.get_num_threads(),
        # the C++ CPU experts kernel's path (avx512_bf16, avx512, avx2, generic, "torch: why") and the overrides
        "cpu_isa": _cpu_isa_or_error(),
        "env": {k: os.environ[k] for k in ("QWEN3MOE_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                           "OMP_NUM_THREADS") if k in os.environ},
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


def _cpu_isa_or_error() -> str | None:
    try:
        return _ext.cpu_isa()
    except ValueError as exc:  # a QWEN3MOE_CPU_ISA this CPU cannot run: the rows will say so too
        return f"error: {exc}"


def device_label(info: dict[str, Any]) -> str:
    if info.get("gpu"):
        return f"{info['gpu']} (sm_{info.get('gpu_capability', '?').replace('.', '')})"
    isa = f", experts {info['cpu_isa']}" if info.get("cpu_isa") else ""
    return f"{info.get('cpu_model')} ({info.get('cpu_capability')}{isa}, {info.get('cpu_threads')} threads)"


# ------------------------------------------------------------------------------- measured GPU limits


def device_peak(device: str | torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """The measured peak a compute row's ``frac_peak`` is taken of (``roofline.device_peak``), or None.

    GPU only: a shared CPU's "peak" is not a stable number. bf16 and fp16 rows only: the measured matmul rate is
    bf16's (fp16 runs at it on the GPUs this targets); against it an fp32 GEMM would look 10-15x further from its
    limit than it is, and no fp32/tf32 rate is measured.
    """
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return roofline.device_peak(device)


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float | None:
    """The measured device copy bandwidth in GB/s (read + write), which memory-bound rows report a fraction of,
    in any dtype; None off the GPU. The same measurement as :func:`device_peak`'s."""
    peak = roofline.device_peak(device) if torch.device(device).type == "cuda" else None
    return peak["gbps"] if peak else None


# ------------------------------------------------------------------------------------- measured CPU limits


def cpu_read_probe(mbytes: int = 512) -> tuple[Any, float]:
    """``(fn, bytes)``: an fp32 ``sum`` over ``mbytes`` MB (no cache holds it), the read bandwidth a memory-bound
    row is reported a fraction of (``frac_read_bw``). Measured in the same run, interleaved like the rows."""
    buf = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32)
    return (lambda: buf.sum()), float(buf.numel() * 4)


def cpu_mm_probe(dtype: torch.dtype, M: int = 512, N: int = 1536, K: int = 2048) -> tuple[Any, float]:
    """``(fn, flops)``: ``torch.mm`` (oneDNN) of [M, K] by a [N, K] weight's transpose, as ``F.linear`` runs a
    layer: the block's gate_up GEMM shape at Qwen3-30B-A3B with M rows. The matmul rate a compute-bound row is
    reported a fraction of (``frac_mm``)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    return (lambda: torch.mm(a, w.t())), 2.0 * M * N * K
