"""rms_norm and fused_add_rms_norm at Qwen3-30B-A3B's hidden size: x and residual [T, 2048], weight [2048].
Ours (``impl`` "cpu"/"cuda"), the reference ("eager") and transformers' ``Qwen3MoeRMSNorm`` module (for the
fused add: the decoder layer's ``norm(x + residual)``), checked first. See ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import ops, reference
from ..tolerances import tol
from .machine import copy_bandwidth, default_dtype, impl_name, machine_info
from .report import add_rates, op_row
from .timing import time_interleaved

HIDDEN = 2048
EPS = 1e-6


def _hf_norm(w: torch.Tensor):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    m = Qwen3MoeRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)
    m.weight.data.copy_(w)
    return m


def implementations(w: torch.Tensor) -> dict[str, dict[str, Callable]]:
    """``op -> {"ours" | "eager" | "transformers": fn(x, residual) -> normed x}``."""
    hf = _hf_norm(w)
    return {
        "rms_norm": {"ours": lambda x, r: ops.rms_norm(x, w, EPS),
                     "eager": lambda x, r: reference.rms_norm(x, w, EPS),
                     "transformers": lambda x, r: hf(x)},
        "fused_add_rms_norm": {"ours": lambda x, r: ops.fused_add_rms_norm(x, r, w, EPS)[0],
                               "eager": lambda x, r: reference.fused_add_rms_norm(x, r, w, EPS)[0],
                               "transformers": lambda x, r: hf(x + r)},
    }


def make_inputs(T: int, hidden: int, dtype: torch.dtype, device, seed: int):
    """3 input sets (x, residual), rotated so a small op cannot keep one hot in cache, and the norm weight."""
    g = torch.Generator().manual_seed(seed)
    sets = [tuple(torch.randn(T, hidden, generator=g).to(device, dtype) for _ in range(2)) for _ in range(3)]
    return sets, (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)


def check(impls: dict[str, Callable], args: tuple, dtype: torch.dtype) -> None:
    """Every implementation within the "norm" tolerance of the reference."""
    with torch.inference_mode():
        ref = impls["eager"](*args)
        for fn in impls.values():
            torch.testing.assert_close(fn(*args), ref, **tol("norm", dtype))


def run(device, token_counts: Sequence[int], dtype: torch.dtype | None = None, budget_s: float = 0.5,
        hidden: int = HIDDEN) -> list[dict[str, Any]]:
    """One row per (T, op, implementation), with GB/s of x (and residual) and weight read, out written."""
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    info = machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        sets, w = make_inputs(T, hidden, dtype, dev, seed=T)
        for op, impls in implementations(w).items():
            nio = 2 if op == "rms_norm" else 4  # [T, H] tensors read or written
            nbytes = nio * T * hidden * sets[0][0].element_size() + hidden * w.element_size()
            check(impls, sets[0], dtype)
            times = time_interleaved(impls, sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            for name, t in times.items():
                r = op_row(op, impl_name(dev) if name == "ours" else name, T, dtype, info, t, shape=f"H={hidden}",
                           vs_reference=times["eager"]["median_ms"] / t["median_ms"],
                           vs_transformers=times["transformers"]["median_ms"] / t["median_ms"])
                add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
    return rows
