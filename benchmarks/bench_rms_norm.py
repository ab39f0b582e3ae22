"""Benchmark of qwen3moe::rms_norm and fused_add_rms_norm vs the reference and transformers' Qwen3MoeRMSNorm.

Bytes moved: read x (and residual) + weight, write out (and the new residual). GB/s against the measured copy
bandwidth on a GPU. Results are checked against the reference before timing.
"""

from __future__ import annotations

import pytest
import torch

from qwen3moe_kernels import bench, reference
from qwen3moe_kernels.ops.rms_norm import fused_add_rms_norm, rms_norm
from qwen3moe_kernels.tolerances import tol

from bench_moe_permute import copy_bandwidth, impl_name

HIDDEN = 2048
EPS = 1e-6


def _hf_norm(w):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    m = Qwen3MoeRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)
    m.weight.data.copy_(w)
    return m


def run(device, token_counts, dtype=None, budget_s: float = 0.5, hidden: int = HIDDEN):
    """Plain entry point for ``qwen3moe-kernels bench``: one dict per (op, implementation, token count)."""
    dev = torch.device(device)
    dtype = dtype or (bench.cpu_bench_dtype()[0] if dev.type == "cpu" else torch.bfloat16)
    info = bench.machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        g = torch.Generator().manual_seed(T)
        sets = [tuple(torch.randn(T, hidden, generator=g).to(dev, dtype) for _ in range(2)) for _ in range(3)]
        w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dev, dtype)
        hf = _hf_norm(w)
        for op, impls, nio in (
            ("rms_norm", {"ours": lambda x, r: rms_norm(x, w, EPS), "eager": lambda x, r: reference.rms_norm(x, w, EPS),
                          "transformers": lambda x, r: hf(x)}, 2),
            ("fused_add_rms_norm", {"ours": lambda x, r: fused_add_rms_norm(x, r, w, EPS)[0],
                                    "eager": lambda x, r: reference.fused_add_rms_norm(x, r, w, EPS)[0],
                                    "transformers": lambda x, r: hf(x + r)}, 4),
        ):
            nbytes = nio * T * hidden * sets[0][0].element_size() + hidden * w.element_size()
            got = {}
            ref = impls["eager"](*sets[0])
            for name, fn in impls.items():
                with torch.inference_mode():
                    torch.testing.assert_close(fn(*sets[0]), ref, **tol("elementwise", dtype))
                t = bench.time_fn(fn, sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
                impl = impl_name(device) if name == "ours" else name
                got[name] = t["median_ms"]
                r = {"op": op, "impl": impl, "tokens": T, "dtype": bench.dtype_name(dtype), **t, "device": str(dev),
                     "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"], "gpu": info["gpu"],
                     "shape": f"H={hidden}"}
                bench.add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
            for r in rows[-len(impls):]:
                r["vs_reference"] = got["eager"] / r["median_ms"]
    return rows


from conftest import bench_device, bench_tokens  # noqa: E402


@pytest.mark.parametrize("tokens", bench_tokens())
def test_rms_norm(benchmark, tokens):
    dev = bench_device()
    x = torch.randn(tokens, HIDDEN, device=dev)
    w = torch.ones(HIDDEN, device=dev)
    torch.testing.assert_close(rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), **tol("elementwise", x.dtype))
    benchmark(rms_norm, x, w, EPS)
