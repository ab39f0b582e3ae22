"""router_topk (softmax, top-k, renormalise) at the Qwen3-30B-A3B router shape: logits [T, 128] -> weights [T, 8]
fp32 and ids [T, 8] int32. Ours (``impl`` "cpu"/"cuda"), the reference ("eager") and the three torch calls
transformers' router makes ("transformers"), checked first. See ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import ops, reference
from ..tolerances import tol
from .machine import copy_bandwidth, default_dtype, impl_name, machine_info
from .report import add_rates, op_row
from .timing import time_fn

E, K = 128, 8


def transformers_router(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' Qwen3MoeTopKRouter does after its linear layer."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


IMPLS = {"ours": ops.router_topk, "eager": reference.router_topk, "transformers": transformers_router}


def check(out: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor) -> None:
    """Weights within the "router" tolerance; ids exactly, except where two probabilities tie within rounding
    (transformers' topk fixes no order for ties)."""
    w, ids = out
    rw, rids = reference.router_topk(logits, K, True)
    torch.testing.assert_close(w.float(), rw, **tol("router", logits.dtype))
    differ = (ids.int() != rids).any(-1)
    if differ.any():
        p = torch.softmax(logits.double(), -1)
        assert torch.allclose(p.gather(1, ids.long())[differ], p.gather(1, rids.long())[differ], rtol=1e-6), \
            "top-k ids differ beyond a near-tie"


def make_inputs(T: int, device, dtype: torch.dtype) -> list[tuple]:
    """3 argument sets ``(logits [T, E], K, True)``, rotated so a small op cannot keep one hot in cache."""
    g = torch.Generator().manual_seed(T)
    return [(torch.randn(T, E, generator=g).to(device, dtype), K, True) for _ in range(3)]


def run(device, token_counts: Sequence[int], dtype: torch.dtype | None = None,
        budget_s: float = 0.5) -> list[dict[str, Any]]:
    """One row per (T, implementation), op "router_topk", with GB/s of logits read + outputs written."""
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    info = machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        arg_sets = make_inputs(T, dev, dtype)
        nbytes = T * E * arg_sets[0][0].element_size() + T * K * 8
        got = []
        for name, fn in IMPLS.items():
            with torch.inference_mode():
                check(fn(*arg_sets[0]), arg_sets[0][0])
            t = time_fn(fn, arg_sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            r = op_row("router_topk", impl_name(dev) if name == "ours" else name, T, dtype, info, t,
                       shape=f"E={E} k={K}")
            add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
            got.append(r)
        eager = next(r for r in got if r["impl"] == "eager")
        for r in got:
            r["vs_reference"] = eager["median_ms"] / r["median_ms"]
        rows += got
    return rows
