"""Benchmark of the token-permutation ops (moe_sort, moe_align_block, moe_permute, moe_unpermute) at the
Qwen3-30B-A3B shapes (E=128, top-8, H=2048), ours vs the reference (``impl="eager"``: qwen3moe_kernels.reference,
the spec), in the same run, at decode and prefill token counts.

Every implementation's output is checked against the reference before it is timed (index ops and permute exactly,
unpermute with the "elementwise" tolerance). On a GPU each row also gets GB/s (bytes the op must move / median
time) and that as a percentage of the measured device copy bandwidth (a large ``copy_``, read + write).

    pytest benchmarks/bench_moe_permute.py --benchmark-enable           # pytest-benchmark
    qwen3moe-kernels bench --ops moe_permute                            # the table (calls run())
"""

from __future__ import annotations

import functools

import pytest
import torch

from qwen3moe_kernels import bench, reference
from qwen3moe_kernels.ops import moe_permute as ops
from qwen3moe_kernels.tolerances import tol

SHAPES = {"hidden": 2048, "experts": 128, "top_k": 8, "block_size": 64}


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float | None:
    """Measured device copy bandwidth in GB/s (read + write of a 512 MiB copy_); None off the GPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    src = torch.empty(2**29, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = bench.time_fn(lambda: dst.copy_(src), [()], dev, warmup=3, min_runs=10, budget_s=0.5)
    return 2 * src.numel() / (t["median_ms"] * 1e-3) / 1e9


def impl_name(device: str) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def cases(T: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Per op: (args builder over input-set index, ours, reference, bytes moved, compare kind)."""
    E, k, H, B = SHAPES["experts"], SHAPES["top_k"], SHAPES["hidden"], SHAPES["block_size"]
    g = torch.Generator().manual_seed(seed + T)
    sets = []
    for _ in range(3):  # rotated, so a small op cannot keep one input hot in cache
        ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.int().to(device)
        s, inv, _ = reference.moe_sort(ids, E)
        sets.append({
            "ids": ids, "sorted": s, "inv": inv,
            "x": torch.randn(T, H, generator=g).to(device, dtype),
            "y": torch.randn(T * k, H, generator=g).to(device, dtype),
            "w": torch.rand(T, k, generator=g).to(device),
        })
    es = torch.tensor([], dtype=dtype).element_size()
    N = T * k
    return {
        "moe_sort": ([(d["ids"], E) for d in sets], ops.moe_sort, reference.moe_sort, N * 4 * 3 + (E + 1) * 4, "exact"),
        "moe_align_block": ([(d["ids"], E, B) for d in sets], ops.moe_align_block, reference.moe_align_block,
                            N * 4 + ops.padded_bound(N, E, B) * 4, "exact"),
        "moe_permute": ([(d["x"], d["sorted"], k) for d in sets], ops.moe_permute, reference.moe_permute,
                        2 * N * H * es + N * 4, "exact"),
        "moe_unpermute": ([(d["y"], d["w"], d["inv"]) for d in sets], ops.moe_unpermute, reference.moe_unpermute,
                          N * H * es + T * H * es + N * 8, "elementwise"),
    }


def check(out, ref, kind: str, dtype: torch.dtype) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        if kind == "exact" or not o.is_floating_point():
            assert torch.equal(o, r), "result differs from the reference"
        else:
            torch.testing.assert_close(o, r, **tol(kind, dtype))


def run(device, token_counts, dtype=None, ops_wanted=None, budget_s: float = 0.5):
    """Plain entry point for ``qwen3moe-kernels bench``: one dict per (op, implementation, token count)."""
    dev = torch.device(device)
    dtype = dtype or (bench.cpu_bench_dtype()[0] if dev.type == "cpu" else torch.bfloat16)
    info = bench.machine_info(dev)
    peak = copy_bandwidth(str(dev))
    rows = []
    for T in token_counts:
        for op, (arg_sets, ours, ref, nbytes, kind) in cases(T, str(dev), dtype).items():
            if ops_wanted and op not in ops_wanted:
                continue
            if op == "moe_align_block" and T > 4096:  # the reference loops over experts in Python with syncs
                impls = [(impl_name(device), ours)]
            else:
                impls = [(impl_name(device), ours), ("eager", ref)]
            with torch.inference_mode():
                check(ours(*arg_sets[0]), ref(*arg_sets[0]), kind, dtype)
            got = {}
            for impl, fn in impls:
                t = bench.time_fn(fn, arg_sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
                got[impl] = t["median_ms"]
                r = {"op": op, "impl": impl, "tokens": T, "dtype": bench.dtype_name(dtype), **t,
                     "device": str(dev), "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"],
                     "gpu": info["gpu"], "shape": f"E={SHAPES['experts']} k={SHAPES['top_k']} H={SHAPES['hidden']}"}
                bench.add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
            for r in rows[-len(impls):]:
                if "eager" in got:
                    r["vs_reference"] = got["eager"] / r["median_ms"]
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark

from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens  # noqa: E402


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("op", ["moe_sort", "moe_align_block", "moe_permute", "moe_unpermute"])
def test_moe_permute_ops(benchmark, op, impl, tokens):
    device, dtype = bench_device(), bench_dtype()
    arg_sets, ours, ref, nbytes, kind = cases(tokens, device, dtype)[op]
    fn = ours if impl == "ours" else ref
    with torch.inference_mode():
        check(fn(*arg_sets[0]), ref(*arg_sets[0]), kind, dtype)
    bench.pedantic_rotating(benchmark, fn, arg_sets, device, group=f"{op} T={tokens}",
                            rounds=5 if tokens >= 4096 else 20, op=op,
                            impl=impl if impl == "eager" else impl_name(device), tokens=tokens,
                            dtype=bench.dtype_name(dtype), bytes=nbytes)
