"""Benchmark of qwen3moe::rope and qwen3moe::qk_norm_rope vs the reference and transformers, in the same run.

Shapes: the attention prologue of Qwen3-30B-A3B (32 q heads, 4 kv heads, head_dim 128; ``--model 235b``: 64 q
heads) for ``T`` tokens (B=1, S=T), q and k as strided views of the q/k projections exactly as the attention
produces them. Implementations: ``ours`` (``qwen3moe_kernels.ops.rope``: C++ on CPU, Triton on CUDA), ``eager``
(``qwen3moe_kernels.reference``), ``transformers`` (``Qwen3MoeRMSNorm`` q_norm/k_norm modules and
``apply_rotary_pos_emb`` in transformers' [B, H, S, D] layout). Every result is checked against the reference
before timing; implementations are timed interleaved (bench.time_interleaved). Bytes moved: read q, k and the
cos/sin rows, write q, k; GB/s against the measured copy bandwidth on a GPU.

    python benchmarks/bench_rope.py [--device cpu] [--tokens 1,8,512,4096] [--model 30b|235b]
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3moe_kernels import bench, reference  # noqa: E402
from qwen3moe_kernels.ops.rope import qk_norm_rope, rope, rope_by_positions  # noqa: E402
from qwen3moe_kernels.tolerances import tol  # noqa: E402

from bench_moe_permute import copy_bandwidth, impl_name  # noqa: E402

MODELS = {"30b": (32, 4, 128), "235b": (64, 4, 128)}
EPS = 1e-6
THETA = 1e6


def _hf():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    return hf


def _inputs(T, hq, hk, d, dtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, hq * d, generator=g).to(dev, dtype).view(1, T, hq, d)
    k = torch.randn(1, T, hk * d, generator=g).to(dev, dtype).view(1, T, hk, d)
    pos = torch.arange(T, device=dev)[None] + 100
    cos, sin = reference.rope_cos_sin(pos, d, THETA, dtype)
    return q, k, cos, sin, pos


def implementations(d: int, dtype, dev) -> dict[str, dict]:
    """``op -> {impl: fn(q, k, cos, sin, positions)}``: ours (C++ on CPU, Triton on CUDA; for rope also from
    positions), the reference ("eager") and transformers (Qwen3MoeRMSNorm q_norm/k_norm modules and
    apply_rotary_pos_emb in its [B, H, S, D] layout)."""
    hf = _hf()
    g = torch.Generator().manual_seed(1)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(dev, dtype)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dev, dtype)
    q_norm, k_norm = hf.Qwen3MoeRMSNorm(d, eps=EPS).to(dev, dtype), hf.Qwen3MoeRMSNorm(d, eps=EPS).to(dev, dtype)
    q_norm.weight.data.copy_(qw)
    k_norm.weight.data.copy_(kw)

    def hf_rope(q, k, cos, sin):
        a, b = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return a.transpose(1, 2), b.transpose(1, 2)

    return {
        "rope": {"ours": lambda q, k, c, s, p: rope(q, k, c, s),
                 "ours-positions": lambda q, k, c, s, p: rope_by_positions(q, k, p, THETA),
                 "eager": lambda q, k, c, s, p: reference.rope(q, k, c, s),
                 "transformers": lambda q, k, c, s, p: hf_rope(q, k, c, s)},
        "qk_norm_rope": {"ours": lambda q, k, c, s, p: qk_norm_rope(q, k, qw, kw, c, s, EPS),
                         "eager": lambda q, k, c, s, p: reference.qk_norm_rope(q, k, qw, kw, c, s, EPS),
                         "transformers": lambda q, k, c, s, p: hf_rope(q_norm(q), k_norm(k), c, s)},
    }


def check(op: str, out, ref, dtype) -> None:
    kind = "norm" if op == "qk_norm_rope" else "elementwise"
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol(kind, dtype))


def run(device, token_counts, dtype=None, budget_s: float = 0.5, model: str = "30b"):
    """Plain entry point (also for ``qwen3moe-kernels bench``): one dict per (op, implementation, token count)."""
    dev = torch.device(device)
    dtype = dtype or (bench.cpu_bench_dtype()[0] if dev.type == "cpu" else torch.bfloat16)
    info = bench.machine_info(dev)
    peak = copy_bandwidth(str(dev))
    hq, hk, d = MODELS[model]
    all_impls = implementations(d, dtype, dev)
    rows = []
    for T in token_counts:
        sets = [_inputs(T, hq, hk, d, dtype, dev, seed) for seed in range(3)]
        nbytes = 2 * T * (hq + hk) * d * sets[0][0].element_size() + 2 * T * d * sets[0][0].element_size()
        for op, impls in all_impls.items():
            with torch.inference_mode():
                ref = impls["eager"](*sets[0])
                for fn in impls.values():
                    check(op, fn(*sets[0]), ref, dtype)
            times = bench.time_interleaved(impls, sets, dev, warmup=3, min_runs=5, budget_s=budget_s)
            for name, t in times.items():
                impl = impl_name(device) + name[4:] if name.startswith("ours") else name
                r = {"op": op, "impl": impl, "tokens": T, "dtype": bench.dtype_name(dtype), **t,
                     "vs_reference": times["eager"]["median_ms"] / t["median_ms"],
                     "vs_transformers": times["transformers"]["median_ms"] / t["median_ms"], "device": str(dev),
                     "cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"], "gpu": info["gpu"],
                     "shape": f"Hq={hq} Hk={hk} D={d}"}
                bench.add_rates(r, None, nbytes, {"gbps": peak} if peak else None)
                rows.append(r)
    return rows


def _print(rows):
    print(f"{'op':14s} {'impl':16s} {'T':>5s} {'median_ms':>10s} {'p10':>8s} {'p90':>8s} {'x eager':>8s} {'x HF':>7s}")
    for r in rows:
        print(f"{r['op']:14s} {r['impl']:16s} {r['tokens']:5d} {r['median_ms']:10.4f} {r['p10_ms']:8.4f} "
              f"{r['p90_ms']:8.4f} {r['vs_reference']:8.2f} {r['vs_transformers']:7.2f}")


from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens  # noqa: E402


CASES = [(op, impl) for op, impls in (("rope", ("ours", "ours-positions", "eager", "transformers")),
                                       ("qk_norm_rope", ("ours", "eager", "transformers"))) for impl in impls]


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("op,impl", CASES)
def test_rope(benchmark, op, impl, tokens):
    dev, dtype = bench_device(), bench_dtype()
    hq, hk, d = MODELS["30b"]
    impls = implementations(d, dtype, dev)[op]
    fn = impls[impl]
    sets = [_inputs(tokens, hq, hk, d, dtype, dev, seed) for seed in range(3)]
    with torch.inference_mode():
        check(op, fn(*sets[0]), impls["eager"](*sets[0]), dtype)
    bench.pedantic_rotating(benchmark, fn, sets, dev, group=f"{op} T={tokens}", op=op,
                            impl=impl_name(dev) + impl[4:] if impl.startswith("ours") else impl, tokens=tokens,
                            dtype=bench.dtype_name(dtype))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="1,8,512,4096")
    ap.add_argument("--model", default="30b", choices=sorted(MODELS))
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--json", default=None, help="also save the rows with the machine record (bench.save_json)")
    a = ap.parse_args()
    rows = run(a.device, [int(t) for t in a.tokens.split(",")], budget_s=a.budget, model=a.model)
    info = bench.machine_info(a.device)
    print(f"# {info['cpu_model']} capability={info['cpu_capability']} gpu={info['gpu']} "
          f"threads={torch.get_num_threads()}")
    _print(rows)
    if a.json:
        bench.save_json(a.json, rows, info, vars(a))
