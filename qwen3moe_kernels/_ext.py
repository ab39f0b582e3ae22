"""Loads the compiled extension ``qwen3moe_kernels._C`` (the C++/CUDA ops registered under ``torch.ops.qwen3moe``).

``AVAILABLE`` says whether it imported (a checkout that was never built falls back to the reference, visibly);
``WITH_CUDA`` whether its CUDA kernels were compiled in (the CPU-only build, ``QWEN3MOE_SKIP_CUDA_BUILD=1``, has
none); ``CPU_EXPERTS`` whether the experts forward has its C++ CPU kernel (x86-64 builds), :func:`cpu_isa` the path
it takes; ``BUILD`` is the build's record (``_C_build.json``, written by setup.py: the torch it was built against and
its CUDA archs). An extension built against another torch than the one running is an error at import, naming both
versions and the fix, rather than an undefined-symbol trace or a crash later. :func:`kernel_impl` names the
implementation a tensor's device gets: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``None`` (no kernel: run the
reference).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BUILD_RECORD = Path(__file__).with_name("_C_build.json")
REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the source checkout"


class BuildMismatchError(ImportError):
    """``qwen3moe_kernels._C`` was compiled against another torch than the one running."""


def check_build(record: dict | None, running: str) -> None:
    """Raise :class:`BuildMismatchError` when the build ``record`` names another torch than ``running``."""
    if record is not None and record.get("torch") != running:
        raise BuildMismatchError(f"qwen3moe_kernels._C was built against torch {record.get('torch')}, but torch "
                                 f"{running} is running: {REBUILD}")


def _read_record() -> dict | None:
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):  # no record: a build older than the record, or none at all
        return None


BUILD = _read_record()
check_build(BUILD, torch.__version__)
try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    AVAILABLE = True
    WITH_CUDA = bool(getattr(_C, "with_cuda", 0))
    CPU_EXPERTS = bool(getattr(_C, "cpu_experts", 0))
    IMPORT_ERROR: str | None = None
except ImportError as exc:
    if "undefined symbol" in str(exc):  # no record to compare, but the classic sign of another torch's ABI
        raise BuildMismatchError(f"qwen3moe_kernels._C does not load against torch {torch.__version__} ({exc}); "
                                 f"it was most likely built against another torch: {REBUILD}") from exc
    AVAILABLE = False  # not built (a source checkout without pip install -e .)
    WITH_CUDA = False
    CPU_EXPERTS = False
    IMPORT_ERROR = repr(exc)


HAS_TRITON = importlib.util.find_spec("triton") is not None


def cpu_isa() -> str | None:
    """The ISA path the C++ CPU experts kernel takes now: "avx512_bf16", "avx512", "avx2" or "generic" (the best the
    CPU has, or the lower one ``QWEN3MOE_CPU_ISA`` names; one the CPU cannot run is a ValueError), "torch: why" where
    it hands the call to the torch implementation (a CPU without AVX2/FMA/F16C, ``QWEN3MOE_CPU_ISA=torch``), or None
    where there is no such kernel (a build for another architecture, or no build)."""
    return _C.cpu_isa() if CPU_EXPERTS else None


def kernel_impl(device: torch.device, triton: bool = False) -> str | None:
    """The implementation an op's kernels give tensors on ``device``: ``"cpu"`` (the C++ kernels), ``"cuda"`` (the
    CUDA C++ kernels) or, for ops whose GPU kernels are Triton (``triton=True``), ``"triton"``; ``None`` when there
    is none (the op runs the reference)."""
    if not AVAILABLE:
        return None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if triton:
            return "triton" if HAS_TRITON else None
        return "cuda" if WITH_CUDA else None
    return None


def no_kernel_reason(device: torch.device, triton: bool = False) -> str:
    """Why :func:`kernel_impl` gave None."""
    if not AVAILABLE:
        return f"qwen3moe_kernels._C is not built ({IMPORT_ERROR})"
    if device.type == "cuda":
        return "triton is not installed" if triton else "qwen3moe_kernels._C was built without CUDA kernels"
    return f"no kernel for device {device.type}"
