"""pytest-benchmark suite of moe_sort, moe_align_block, moe_permute, moe_unpermute
(``qwen3moe_kernels.bench.moe_permute``): ours and eager."""

import pytest
import torch

from qwen3moe_kernels.bench import moe_permute as b
from qwen3moe_kernels.bench.machine import bench_device, bench_dtype, bench_tokens, dtype_name, impl_name
from qwen3moe_kernels.bench.timing import pedantic_rotating


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("op", b.OPS)
def test_moe_permute_ops(benchmark, op, impl, tokens):
    device, dtype = bench_device(), bench_dtype()
    arg_sets, ours, ref, nbytes, kind = b.cases(tokens, device, dtype)[op]
    fn = ours if impl == "ours" else ref
    with torch.inference_mode():
        b.check(fn(*arg_sets[0]), ref(*arg_sets[0]), kind, dtype)
    pedantic_rotating(benchmark, fn, arg_sets, device, group=f"{op} T={tokens}", rounds=5 if tokens >= 4096 else 20,
                      op=op, impl=impl if impl == "eager" else impl_name(device), tokens=tokens,
                      dtype=dtype_name(dtype), bytes=nbytes)
