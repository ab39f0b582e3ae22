"""pytest-benchmark suite of the sparse MoE block (``qwen3moe_kernels.bench.fused_moe``), forward and
forward + backward, at the Qwen3-30B-A3B shapes: fused, eager and transformers' block."""

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.bench import fused_moe as b
from qwen3moe_kernels.bench.checks import check_moe_block, max_abs_err
from qwen3moe_kernels.bench.machine import bench_device, bench_dtype, bench_tokens, dtype_name
from qwen3moe_kernels.bench.timing import pedantic_rotating

S = b.QWEN3_30B_A3B


@pytest.fixture(scope="module")
def weights():
    return b.make_moe_weights(S["hidden"], S["moe_intermediate"], S["experts"], bench_dtype(), bench_device())


def _inputs(tokens):
    g = torch.Generator().manual_seed(tokens)
    return [torch.randn(tokens, S["hidden"], generator=g).to(bench_device(), bench_dtype()) for _ in range(3)]


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", b.IMPLS)
def test_fused_moe(benchmark, weights, impl, tokens):
    try:
        fn = b.implementation(impl, weights, S["top_k"])
    except Exception as exc:  # transformers missing or the mode unavailable on this device
        pytest.skip(f"{impl}: {exc}")
    xs = _inputs(tokens)
    with torch.inference_mode():
        ref = reference.fused_moe(xs[0], weights["router_weight"], weights["w_gate_up"], weights["w_down"],
                                  S["top_k"], True)[0]
        err, bound, ok = check_moe_block(fn(xs[0]), xs[0], weights, S["top_k"], ref)
    assert ok, f"{impl} T={tokens}: max error {err:.3e} > allowed {bound:.3e}"
    pedantic_rotating(benchmark, fn, [(x,) for x in xs], bench_device(), group=f"fused_moe T={tokens}",
                      rounds=5 if tokens >= 512 else 20, impl=impl, tokens=tokens, dtype=dtype_name(bench_dtype()),
                      max_err=err)


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", b.FWD_BWD_IMPLS)
def test_fused_moe_fwd_bwd(benchmark, weights, impl, tokens):
    try:
        fn, params = b.fwd_bwd_implementation(impl, weights, S["top_k"])
    except Exception as exc:
        pytest.skip(f"{impl}: {exc}")
    xs = _inputs(tokens)
    ref = b.fwd_bwd_reference(xs[0], weights, S["top_k"])
    bounds = b.fwd_bwd_bounds(b.fwd_bwd_call(*b.fwd_bwd_implementation("eager", weights, S["top_k"]), xs[0]), ref)
    for what, got, r, bound in zip(("output", "dx"), b.fwd_bwd_call(fn, params, xs[0]), ref, bounds):
        err = max_abs_err(got, r)
        assert err <= bound, f"{impl} T={tokens}: {what} error {err:.3e} > allowed {bound:.3e}"
    pedantic_rotating(benchmark, lambda x: b.fwd_bwd_call(fn, params, x), [(x,) for x in xs], bench_device(),
                      group=f"fused_moe fwd+bwd T={tokens}", rounds=3 if tokens >= 512 else 10, warmup_rounds=1,
                      inference=False, impl=impl, tokens=tokens, dtype=dtype_name(bench_dtype()))
