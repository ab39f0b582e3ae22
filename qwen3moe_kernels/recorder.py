"""Which implementation each op ran, and visible fallbacks.

Every public op records the implementation it used (``"cuda"``, ``"triton"``, ``"cpu"``, ...) under its name each
time it runs. Where no kernel fits inputs that are still valid (a dtype or device without a kernel), it runs the
reference, records ``"reference (why)"`` and warns once per (op, reason) with a :class:`FallbackWarning`.
Nothing is recorded while ``torch.compile`` traces (the op is only being traced then).

    >>> qwen3moe_kernels.implementations()   # {"router_topk": "cpu", "rms_norm": "reference (no kernel for mps)"}
"""

from __future__ import annotations

import threading
import warnings

import torch

_lock = threading.Lock()
_last: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()


class FallbackWarning(UserWarning):
    """An op ran the pure-PyTorch reference because no kernel fits its (valid) inputs."""


def record(op: str, impl: str) -> None:
    """Note that ``op`` just ran with implementation ``impl``."""
    if torch.compiler.is_compiling():
        return
    with _lock:
        _last[op] = impl


def fallback(op: str, reason: str) -> None:
    """Record that ``op`` ran the reference because of ``reason``, warning once per (op, reason)."""
    if torch.compiler.is_compiling():
        return
    record(op, f"reference ({reason})")
    with _lock:
        first = (op, reason) not in _warned
        _warned.add((op, reason))
    if first:
        warnings.warn(f"qwen3moe_kernels: {op} runs the pure-PyTorch reference: {reason}", FallbackWarning,
                      stacklevel=3)


def implementations() -> dict[str, str]:
    """The implementation each op used the last time it ran, by op name."""
    with _lock:
        return dict(_last)


def reset() -> None:
    """Forget what ran and which fallbacks were already reported (tests use this)."""
    with _lock:
        _last.clear()
        _warned.clear()
