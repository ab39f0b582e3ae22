"""Benchmark of the whole sparse MoE block at the Qwen3-30B-A3B shapes (H=2048, I=768, E=128, top-8).

Implementations, on the same weights and inputs: ``fused`` (qwen3moe_kernels.fused.sparse_moe_block), ``eager``
(qwen3moe_kernels.reference, the spec) and transformers' own ``Qwen3MoeSparseMoeBlock`` with
``experts_implementation="eager"`` and ``"grouped_mm"``, and that block with our registered experts
(``"transformers-qwen3moe_kernels"``). Every implementation's output is checked against the
reference before it is timed (fp32: the "gemm" tolerance; bf16: at most twice PyTorch's own bf16 error against an
fp32 experts reference on the same routing; tokens tied at the top-k boundary are left out).

Two ways to run it:

    pytest benchmarks/bench_moe_block.py --benchmark-enable        # pytest-benchmark (QWEN3MOE_BENCH_* env vars)
    qwen3moe-kernels bench --ops moe_block                         # the table, JSON and PNG (calls run())

The body of the benchmark lives in the package (``qwen3moe_kernels.bench.bench_moe_block``) so the console command
works from any install; this file is the pytest-benchmark face of it.
"""

from __future__ import annotations

import pytest
import torch

from qwen3moe_kernels import bench, fused, reference

from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens

IMPLS = bench.MOE_BLOCK_IMPLS


def run(device, token_counts, dtype=None, shapes=None, budget_s: float = 1.5):
    """Plain entry point: one dict per (token count, implementation). ``shapes`` overrides
    ``bench.QWEN3_30B_A3B`` (hidden, moe_intermediate, experts, top_k). ``qwen3moe-kernels bench`` calls
    ``bench.bench_moe_block`` itself."""
    return bench.bench_moe_block(device, token_counts, dtype, shapes=shapes, budget_s=budget_s)


@pytest.fixture(scope="module")
def weights():
    s = bench.QWEN3_30B_A3B
    return bench.make_moe_weights(s["hidden"], s["moe_intermediate"], s["experts"], bench_dtype(), bench_device())


def _impl_fn(name, w, k):
    if name == "fused":
        return lambda x: fused.sparse_moe_block(x, w["router_weight"], w["w_gate_up"], w["w_down"], k, True)[0]
    if name == "eager":
        return lambda x: reference.sparse_moe_block(x, w["router_weight"], w["w_gate_up"], w["w_down"], k, True)[0]
    try:
        if name == bench.REGISTERED_EXPERTS:
            from qwen3moe_kernels.integrations.transformers import register

            block = bench.transformers_block(w, k, register())
        else:
            block = bench.transformers_block(w, k, name.split("-", 1)[1])
    except Exception as exc:  # transformers missing or the mode unavailable on this device
        pytest.skip(f"{name}: {exc}")
    return lambda x: block(x[None])[0]


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_block(benchmark, weights, impl, tokens):
    k = bench.QWEN3_30B_A3B["top_k"]
    device = torch.device(bench_device())
    g = torch.Generator().manual_seed(tokens)
    xs = [torch.randn(tokens, weights["w_gate_up"].shape[-1], generator=g).to(device, bench_dtype()) for _ in range(3)]
    fn = _impl_fn(impl, weights, k)
    with torch.inference_mode():
        ref = reference.sparse_moe_block(xs[0], weights["router_weight"], weights["w_gate_up"], weights["w_down"],
                                         k, True)[0]
        err, bound, ok = bench.check_moe_block(fn(xs[0]), xs[0], weights, k, ref)
    assert ok, f"{impl} T={tokens}: max error {err:.3e} > allowed {bound:.3e}"
    it = iter(range(10**9))

    def call():
        x = xs[next(it) % len(xs)]  # rotate input sets
        with torch.inference_mode():
            out = fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"moe_block T={tokens}"
    benchmark.extra_info.update(impl=impl, tokens=tokens, dtype=bench.dtype_name(bench_dtype()), max_err=err)
    benchmark.pedantic(call, rounds=5 if tokens >= 512 else 20, warmup_rounds=2, iterations=1)
