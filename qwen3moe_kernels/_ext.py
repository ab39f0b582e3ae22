"""Loads the compiled extension ``qwen3moe_kernels._C`` (the C++/CUDA ops registered under ``torch.ops.qwen3moe``).

``AVAILABLE`` says whether it imported (an install without a build falls back to the reference, visibly);
``WITH_CUDA`` whether its CUDA kernels were compiled in (the CPU-only build, ``QWEN3MOE_SKIP_CUDA_BUILD=1``, has
none). :func:`kernel_impl` names the implementation a tensor's device gets: ``"cpu"``, ``"cuda"`` or ``None``
(no kernel: run the reference).
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    AVAILABLE = True
    WITH_CUDA = bool(getattr(_C, "with_cuda", 0))
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (e.g. a source checkout without pip install -e .)
    AVAILABLE = False
    WITH_CUDA = False
    IMPORT_ERROR = repr(exc)


def kernel_impl(device: torch.device) -> str | None:
    """``"cpu"`` / ``"cuda"`` when the compiled kernels serve tensors on ``device``, else ``None``."""
    if not AVAILABLE:
        return None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and WITH_CUDA:
        return "cuda"
    return None


def no_kernel_reason(device: torch.device) -> str:
    if not AVAILABLE:
        return f"qwen3moe_kernels._C is not built ({IMPORT_ERROR})"
    if device.type == "cuda":
        return "qwen3moe_kernels._C was built without CUDA kernels"
    return f"no kernel for device {device.type}"
