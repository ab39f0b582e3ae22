"""Benchmark of qwen3moe::rms_norm and fused_add_rms_norm vs the reference and transformers' Qwen3MoeRMSNorm.

    python benchmarks/bench_rms_norm.py [--device cpu] [--tokens 1,8,512,4096] [--hidden 2048]

Bytes moved: read x (and residual) + weight, write out (and the new residual). GB/s against the measured copy
bandwidth on a GPU. Results are checked against the reference before timing.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3moe_kernels import bench, reference  # noqa: E402
from qwen3moe_kernels.ops.rms_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from qwen3moe_kernels.tolerances import tol  # noqa: E402

from bench_moe_permute import copy_bandwidth, impl_name  # noqa: E402

HIDDEN = 2048
EPS = 1e-6


def _hf_norm(w):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    m = Qwen3MoeRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)
    m.weight.data.copy_(w)
    return m


def implementations(w: torch.Tensor) -> dict[str, dict]:
    """``op -> {impl: fn(x, residual)}``: ours, the reference ("eager") and transformers' Qwen3MoeRMSNorm module
    (for the fused add: the decoder layer's ``norm(x + residual)``)."""
    hf = _hf_norm(w)
    return {
        "rms_norm": {"ours": lambda x, r: rms_norm(x, w, EPS), "eager": lambda x, r: reference.rms_norm(x, w, EPS),
                     "transformers": lambda x, r: hf(x)},
        "fused_add_rms_norm": {"ours": lambda x, r: fused_add_rms_norm(x, r, w, EPS)[0],
                               "eager": lambda x, r: reference.fused_add_rms_norm(x, r, w, EPS)[0],
                               "transformers": lambda x, r: hf(x + r)},
    }


def make_inputs(T: int, hidden: int, dtype, dev, seed: int):
    """3 input sets (x, residual), rotated so a small op cannot keep one hot in cache, and the norm weight."""
    g = torch.Generator().manual_seed(seed)
    sets = [tuple(torch.randn(T, hidden, generator=g).to(dev, dtype) for _ in range(2)) for _ in range(3)]
    return sets, (1 + 0.1 * torch.randn(hidden, generator=g)).to(dev, dtype)


def run(device, token_counts, dtype=None, budget_s: float = 0.5, hidden: int = HIDDEN):
    """Plain entry point for ``qwen3moe-kernels bench``: one dict per (op, implementation, token count)."""
    dev = torch.device(device)
    dtype = dtype or (bench.cpu_bench_dtype()[0] if dev.type == "cpu" else torch.bfloat16)
    info = bench.machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        sets, w = make_inputs(T, hidden, dtype, dev, seed=T)
        for op, impls in implementations(w).items():
            nio = 2 if op == "rms_norm" else 4  # tensors of [T, H] read or written
            nbytes = nio * T * hidden * sets[0][0].element_size() + hidden * w.element_size()
            ref = impls["eager"](*sets[0])
            with torch.inference_mode():
                for fn in impls.values():
                    torch.testing.assert_close(fn(*sets[0]), ref, **tol("norm", dtype))
            # interleaved: a burst of load on a shared machine hits every implementation alike
            times = bench.time_interleaved(impls, sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            for name, t in times.items():
                impl = impl_name(device) if name == "ours" else name
                r = {"op": op, "impl": impl, "tokens": T, "dtype": bench.dtype_name(dtype), **t, "device": str(dev),
                     "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"], "gpu": info["gpu"],
                     "shape": f"H={hidden}", "vs_reference": times["eager"]["median_ms"] / t["median_ms"],
                     "vs_transformers": times["transformers"]["median_ms"] / t["median_ms"]}
                bench.add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
    return rows


from qwen3moe_kernels.bench import bench_device, bench_tokens  # noqa: E402  (pytest-benchmark suite below)


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", ["ours", "eager", "transformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
def test_rms_norm(benchmark, op, dtype, impl, tokens):
    dev = bench_device()
    sets, w = make_inputs(tokens, HIDDEN, dtype, dev, seed=tokens)
    impls = implementations(w)[op]
    fn = impls[impl]
    with torch.inference_mode():
        torch.testing.assert_close(fn(*sets[0]), impls["eager"](*sets[0]), **tol("norm", dtype))
    bench.pedantic_rotating(benchmark, fn, sets, dev, group=f"{op} {bench.dtype_name(dtype)} T={tokens}",
                            op=op, impl=impl_name(dev) if impl == "ours" else impl, tokens=tokens,
                            dtype=bench.dtype_name(dtype))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="1,8,512,4096")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--json", default=None, help="also save the rows with the machine record (bench.save_json)")
    a = ap.parse_args()
    out = run(a.device, [int(t) for t in a.tokens.split(",")], budget_s=a.budget, hidden=a.hidden)
    info = bench.machine_info(a.device)
    print(f"# {info['cpu_model']} capability={info['cpu_capability']} gpu={info['gpu']} "
          f"threads={torch.get_num_threads()}")
    print(f"{'op':20s} {'impl':14s} {'T':>5s} {'median_ms':>10s} {'p10':>8s} {'p90':>8s} {'x eager':>8s} {'x HF':>7s}")
    for r in out:
        print(f"{r['op']:20s} {r['impl']:14s} {r['tokens']:5d} {r['median_ms']:10.4f} {r['p10_ms']:8.4f} "
              f"{r['p90_ms']:8.4f} {r['vs_reference']:8.2f} {r['vs_transformers']:7.2f}")
    if a.json:
        bench.save_json(a.json, out, info, vars(a))
