"""rope (from a cos/sin table and from positions) and qk_norm_rope at the attention prologue's shapes: q
[1, T, 32, 128] and k [1, T, 4, 128] (``model="235b"``: 64 q heads), strided views of the q/k projections as the
attention makes them. Ours (``impl`` "cpu"/"cuda", "...-positions"), the reference ("eager") and transformers'
q_norm/k_norm modules with ``apply_rotary_pos_emb`` ("transformers"), checked first. See ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import ops, reference
from ..tolerances import tol
from .machine import copy_bandwidth, default_dtype, impl_name, machine_info
from .report import add_rates, op_row
from .timing import time_interleaved

MODELS = {"30b": (32, 4, 128), "235b": (64, 4, 128)}  # q heads, kv heads, head_dim
EPS = 1e-6
THETA = 1e6


def make_inputs(T: int, hq: int, hk: int, d: int, dtype: torch.dtype, device, seed: int) -> tuple:
    """(q, k, cos, sin, position_ids) at positions 100.. (not 0, so offsets are exercised)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, hq * d, generator=g).to(device, dtype).view(1, T, hq, d)
    k = torch.randn(1, T, hk * d, generator=g).to(device, dtype).view(1, T, hk, d)
    pos = torch.arange(T, device=device)[None] + 100
    cos, sin = reference.rope_cos_sin(pos, d, THETA, dtype)
    return q, k, cos, sin, pos


def implementations(d: int, dtype: torch.dtype, device) -> dict[str, dict[str, Callable]]:
    """``op -> {impl: fn(q, k, cos, sin, position_ids) -> (q, k)}``; transformers' functions work in its
    [B, H, S, D] layout, so its rows pay the transposes the attention would."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    g = torch.Generator().manual_seed(1)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    q_norm, k_norm = hf.Qwen3MoeRMSNorm(d, eps=EPS).to(device, dtype), hf.Qwen3MoeRMSNorm(d, eps=EPS).to(device, dtype)
    q_norm.weight.data.copy_(qw)
    k_norm.weight.data.copy_(kw)
    inv_freq = ops.rope_inv_freq(d, THETA, device)

    def hf_rope(q, k, cos, sin):
        a, b = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return a.transpose(1, 2), b.transpose(1, 2)

    return {
        "rope": {"ours": lambda q, k, c, s, p: ops.rope(q, k, c, s),
                 "ours-positions": lambda q, k, c, s, p: ops.rope_positions(q, k, p, inv_freq),
                 "eager": lambda q, k, c, s, p: reference.rope(q, k, c, s),
                 "transformers": lambda q, k, c, s, p: hf_rope(q, k, c, s)},
        "qk_norm_rope": {"ours": lambda q, k, c, s, p: ops.qk_norm_rope(q, k, qw, kw, c, s, EPS),
                         "eager": lambda q, k, c, s, p: reference.qk_norm_rope(q, k, qw, kw, c, s, EPS),
                         "transformers": lambda q, k, c, s, p: hf_rope(q_norm(q), k_norm(k), c, s)},
    }


def row_impl(name: str, device) -> str:
    """"ours" -> "cpu"/"cuda", "ours-positions" -> "cpu-positions"/"cuda-positions"; others unchanged."""
    return impl_name(device) + name[len("ours"):] if name.startswith("ours") else name


def check(op: str, out, ref, dtype: torch.dtype) -> None:
    kind = "norm" if op == "qk_norm_rope" else "elementwise"
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol(kind, dtype))


def run(device, token_counts: Sequence[int], dtype: torch.dtype | None = None, budget_s: float = 0.5,
        model: str = "30b") -> list[dict[str, Any]]:
    """One row per (T, op, implementation), with GB/s of q, k and the cos/sin rows read, q and k written."""
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    info = machine_info(dev)
    peak = copy_bandwidth(str(dev))
    hq, hk, d = MODELS[model]
    all_impls = implementations(d, dtype, dev)
    rows = []
    for T in token_counts:
        sets = [make_inputs(T, hq, hk, d, dtype, dev, seed) for seed in range(3)]
        es = sets[0][0].element_size()
        nbytes = 2 * T * (hq + hk) * d * es + 2 * T * d * es
        for op, impls in all_impls.items():
            with torch.inference_mode():
                ref = impls["eager"](*sets[0])
                for fn in impls.values():
                    check(op, fn(*sets[0]), ref, dtype)
            times = time_interleaved(impls, sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            for name, t in times.items():
                r = op_row(op, row_impl(name, dev), T, dtype, info, t, shape=f"Hq={hq} Hk={hk} D={d}",
                           vs_reference=times["eager"]["median_ms"] / t["median_ms"],
                           vs_transformers=times["transformers"]["median_ms"] / t["median_ms"])
                add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
    return rows
