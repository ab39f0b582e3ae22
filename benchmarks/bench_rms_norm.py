"""pytest-benchmark suite of rms_norm and fused_add_rms_norm (``qwen3moe_kernels.bench.rms_norm``): ours, eager,
transformers, in fp32 and bf16."""

import pytest
import torch

from qwen3moe_kernels.bench import rms_norm as b
from qwen3moe_kernels.bench.machine import bench_device, bench_tokens, dtype_name, impl_name
from qwen3moe_kernels.bench.timing import pedantic_rotating


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", ["ours", "eager", "transformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
def test_rms_norm(benchmark, op, dtype, impl, tokens):
    device = bench_device()
    sets, w = b.make_inputs(tokens, b.HIDDEN, dtype, device, seed=tokens)
    impls = b.implementations(w)[op]
    b.check({"eager": impls["eager"], impl: impls[impl]}, sets[0], dtype)
    pedantic_rotating(benchmark, impls[impl], sets, device, group=f"{op} {dtype_name(dtype)} T={tokens}", op=op,
                      impl=impl_name(device) if impl == "ours" else impl, tokens=tokens, dtype=dtype_name(dtype))
