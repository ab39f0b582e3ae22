"""Benchmark of router_topk (softmax + top-k + renormalisation) at the Qwen3-30B-A3B router shape (E=128, top-8),
ours vs the reference (``impl="eager"``: qwen3moe_kernels.reference, a stable sort) and the three torch calls
transformers' Qwen3-MoE router makes (``impl="transformers"``: softmax in fp32, torch.topk, divide by the sum),
in the same run, at decode and prefill token counts.

The result is checked before timing (weights with the "router" tolerance; ids exactly, except rows where two
probabilities tie within rounding, which are compared tie-aware). On a GPU: GB/s of logits read + outputs written,
and that as a percentage of the measured copy bandwidth.

    pytest benchmarks/bench_router_topk.py --benchmark-enable
    qwen3moe-kernels bench --ops router_topk
"""

from __future__ import annotations

import pytest
import torch

from qwen3moe_kernels import bench, reference
from qwen3moe_kernels.ops.router_topk import router_topk
from qwen3moe_kernels.tolerances import tol

from bench_moe_permute import copy_bandwidth, impl_name

E, K = 128, 8


def transformers_router(logits: torch.Tensor, top_k: int, renormalize: bool):
    """What transformers' Qwen3MoeTopKRouter does after its linear layer."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def check(out, logits) -> None:
    w, ids = out
    rw, rids = reference.router_topk(logits, K, True)
    torch.testing.assert_close(w.float(), rw, **tol("router", logits.dtype))
    differ = (ids.int() != rids).any(-1)
    if differ.any():  # only near-ties may differ (transformers' topk does not fix an order for ties)
        p = torch.softmax(logits.double(), -1)
        assert torch.allclose(p.gather(1, ids.long())[differ], p.gather(1, rids.long())[differ], rtol=1e-6), \
            "top-k ids differ beyond a near-tie"


def make_inputs(T, device, dtype):
    g = torch.Generator().manual_seed(T)
    return [(torch.randn(T, E, generator=g).to(device, dtype), K, True) for _ in range(3)]


IMPLS = {"ours": router_topk, "eager": reference.router_topk, "transformers": transformers_router}


def run(device, token_counts, dtype=None, budget_s: float = 0.5):
    """Plain entry point for ``qwen3moe-kernels bench``: one dict per (implementation, token count)."""
    dev = torch.device(device)
    dtype = dtype or (bench.cpu_bench_dtype()[0] if dev.type == "cpu" else torch.bfloat16)
    info = bench.machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        arg_sets = make_inputs(T, dev, dtype)
        nbytes = T * E * arg_sets[0][0].element_size() + T * K * 8
        got = {}
        for name, fn in IMPLS.items():
            with torch.inference_mode():
                check(fn(*arg_sets[0]), arg_sets[0][0])
            t = bench.time_fn(fn, arg_sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            impl = impl_name(device) if name == "ours" else name
            got[impl] = t["median_ms"]
            r = {"op": "router_topk", "impl": impl, "tokens": T, "dtype": bench.dtype_name(dtype), **t,
                 "device": str(dev), "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"],
                 "gpu": info["gpu"], "shape": f"E={E} k={K}"}
            bench.add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
            rows.append(r)
        for r in rows[-len(IMPLS):]:
            r["vs_reference"] = got["eager"] / r["median_ms"]
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark

from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens  # noqa: E402


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", list(IMPLS))
def test_router_topk(benchmark, impl, tokens):
    device, dtype = bench_device(), bench_dtype()
    arg_sets = make_inputs(tokens, device, dtype)
    fn = IMPLS[impl]
    with torch.inference_mode():
        check(fn(*arg_sets[0]), arg_sets[0][0])
    bench.pedantic_rotating(benchmark, fn, arg_sets, device, group=f"router_topk T={tokens}",
                            rounds=5 if tokens >= 4096 else 20, impl=impl_name(device) if impl == "ours" else impl,
                            tokens=tokens, dtype=bench.dtype_name(dtype))
