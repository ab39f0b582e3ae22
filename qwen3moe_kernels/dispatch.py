"""Which implementation of each op ran, and visible fallbacks.

Every op records the implementation it used (for example ``"cuda"``, ``"triton"``, ``"cpu"``,
``"reference"``) under its op name each time it runs. When the fused backend has no kernel for a device or
dtype it runs the reference and says so once per (op, reason) with a ``FallbackWarning``; the reason stays
visible afterwards through :func:`implementations`.

    >>> import qwen3moe_kernels as qk
    >>> qk.implementations()          # {"router_topk": "cpu", "grouped_swiglu": "reference (no kernel for mps)"}
"""

from __future__ import annotations

import threading
import warnings

_lock = threading.Lock()
_last: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()


class FallbackWarning(UserWarning):
    """The fused backend ran the pure-PyTorch reference for an op because no kernel fits the inputs."""


def record(op: str, impl: str) -> None:
    """Note that ``op`` just ran with implementation ``impl``."""
    with _lock:
        _last[op] = impl


def fallback(op: str, reason: str) -> None:
    """Record that ``op`` ran the reference because of ``reason``, warning once per (op, reason)."""
    record(op, f"reference ({reason})")
    key = (op, reason)
    with _lock:
        first = key not in _warned
        _warned.add(key)
    if first:
        warnings.warn(
            f"qwen3moe_kernels: {op} runs the pure-PyTorch reference: {reason}", FallbackWarning, stacklevel=3
        )


def implementations() -> dict[str, str]:
    """The implementation each op used the last time it ran, by op name."""
    with _lock:
        return dict(_last)


def reset() -> None:
    """Forget what ran and which fallbacks were already reported (tests use this)."""
    with _lock:
        _last.clear()
        _warned.clear()
