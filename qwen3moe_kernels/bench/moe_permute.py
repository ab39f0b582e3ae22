"""The token-permutation ops moe_sort, moe_align_block, moe_permute and moe_unpermute at the Qwen3-30B-A3B
shapes (E=128, top-8, H=2048): ids [T, k] int32, x [T, H], permuted rows [T*k, H]. Ours (``impl``
"cpu"/"cuda") and the reference ("eager"), checked first (index ops and permute exactly). See
``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import ops, reference
from ..ops.moe_permute import padded_bound
from ..tolerances import tol
from .machine import copy_bandwidth, default_dtype, impl_name, machine_info
from .report import add_rates, op_row
from .timing import time_fn

SHAPES = {"hidden": 2048, "experts": 128, "top_k": 8, "block_size": 64}
OPS = ("moe_sort", "moe_align_block", "moe_permute", "moe_unpermute")


def cases(T: int, device, dtype: torch.dtype, seed: int = 0) -> dict[str, tuple]:
    """Per op: (3 argument sets, ours, reference, bytes the op must move, compare kind)."""
    E, k, H, B = SHAPES["experts"], SHAPES["top_k"], SHAPES["hidden"], SHAPES["block_size"]
    g = torch.Generator().manual_seed(seed + T)
    sets = []
    for _ in range(3):  # rotated, so a small op cannot keep one input hot in cache
        ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.int().to(device)
        s, inv, _ = reference.moe_sort(ids, E)
        sets.append({
            "ids": ids, "sorted": s, "inv": inv,
            "x": torch.randn(T, H, generator=g).to(device, dtype),
            "y": torch.randn(T * k, H, generator=g).to(device, dtype),
            "w": torch.rand(T, k, generator=g).to(device),
        })
    es = torch.tensor([], dtype=dtype).element_size()
    N = T * k
    return {
        "moe_sort": ([(d["ids"], E) for d in sets], ops.moe_sort, reference.moe_sort, N * 4 * 3 + (E + 1) * 4, "exact"),
        "moe_align_block": ([(d["ids"], E, B) for d in sets], ops.moe_align_block, reference.moe_align_block,
                            N * 4 + padded_bound(N, E, B) * 4, "exact"),
        "moe_permute": ([(d["x"], d["sorted"], k) for d in sets], ops.moe_permute, reference.moe_permute,
                        2 * N * H * es + N * 4, "exact"),
        "moe_unpermute": ([(d["y"], d["w"], d["inv"]) for d in sets], ops.moe_unpermute, reference.moe_unpermute,
                          N * H * es + T * H * es + N * 8, "elementwise"),
    }


def check(out, ref, kind: str, dtype: torch.dtype) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        if kind == "exact" or not o.is_floating_point():
            assert torch.equal(o, r), "result differs from the reference"
        else:
            torch.testing.assert_close(o, r, **tol(kind, dtype))


def run(device, token_counts: Sequence[int], dtype: torch.dtype | None = None, ops_wanted: Sequence[str] | None = None,
        budget_s: float = 0.5) -> list[dict[str, Any]]:
    """One row per (T, op of ``ops_wanted``, default all, implementation), with GB/s of the bytes moved."""
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    info = machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        for op, (arg_sets, ours, ref, nbytes, kind) in cases(T, dev, dtype).items():
            if ops_wanted and op not in ops_wanted:
                continue
            impls = {impl_name(dev): ours}
            if not (op == "moe_align_block" and T > 4096):  # the reference loops over experts with host syncs
                impls["eager"] = ref
            with torch.inference_mode():
                check(ours(*arg_sets[0]), ref(*arg_sets[0]), kind, dtype)
            got = []
            for impl, fn in impls.items():
                t = time_fn(fn, arg_sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
                r = op_row(op, impl, T, dtype, info, t,
                           shape=f"E={SHAPES['experts']} k={SHAPES['top_k']} H={SHAPES['hidden']}")
                add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                got.append(r)
            if "eager" in impls:
                for r in got:
                    r["vs_reference"] = got[-1]["median_ms"] / r["median_ms"]
            rows += got
    return rows
