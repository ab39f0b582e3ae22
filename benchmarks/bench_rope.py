"""pytest-benchmark suite of rope (also from positions) and qk_norm_rope (``qwen3moe_kernels.bench.rope``): ours,
eager, transformers."""

import pytest
import torch

from qwen3moe_kernels.bench import rope as b
from qwen3moe_kernels.bench.machine import bench_device, bench_dtype, bench_tokens, dtype_name
from qwen3moe_kernels.bench.timing import pedantic_rotating

CASES = [("rope", impl) for impl in ("ours", "ours-positions", "eager", "transformers")] + \
        [("qk_norm_rope", impl) for impl in ("ours", "eager", "transformers")]


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("op,impl", CASES)
def test_rope(benchmark, op, impl, tokens):
    device, dtype = bench_device(), bench_dtype()
    hq, hk, d = b.MODELS["30b"]
    impls = b.implementations(d, dtype, device)[op]
    sets = [b.make_inputs(tokens, hq, hk, d, dtype, device, seed) for seed in range(3)]
    with torch.inference_mode():
        b.check(op, impls[impl](*sets[0]), impls["eager"](*sets[0]), dtype)
    pedantic_rotating(benchmark, impls[impl], sets, device, group=f"{op} T={tokens}", op=op,
                      impl=b.row_impl(impl, device), tokens=tokens, dtype=dtype_name(dtype))
