"""pytest-benchmark suite of router_topk (``qwen3moe_kernels.bench.router_topk``): ours, eager, transformers."""

import pytest
import torch

from qwen3moe_kernels.bench import router_topk as b
from qwen3moe_kernels.bench.machine import bench_device, bench_dtype, bench_tokens, dtype_name, impl_name
from qwen3moe_kernels.bench.timing import pedantic_rotating


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", list(b.IMPLS))
def test_router_topk(benchmark, impl, tokens):
    device, dtype = bench_device(), bench_dtype()
    arg_sets = b.make_inputs(tokens, device, dtype)
    fn = b.IMPLS[impl]
    with torch.inference_mode():
        b.check(fn(*arg_sets[0]), arg_sets[0][0])
    pedantic_rotating(benchmark, fn, arg_sets, device, group=f"router_topk T={tokens}",
                      rounds=5 if tokens >= 4096 else 20, impl=impl_name(device) if impl == "ours" else impl,
                      tokens=tokens, dtype=dtype_name(dtype))
