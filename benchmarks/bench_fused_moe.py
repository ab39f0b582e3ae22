"""Benchmark of the whole sparse MoE block: ops.fused_moe vs reference.sparse_moe_block and transformers'
Qwen3MoeSparseMoeBlock (experts "eager"), at the Qwen3-30B-A3B shapes (H=2048, I=768, E=128, k=8).

On CPU (default T in {1, 64, 512}) forward only; on a GPU the same code runs at T in {1, 8, 64, 512, 4096, 16384}
and reports TFLOP/s of the experts (6*T*k*H*I per forward). The result is checked against the reference before
timing; each timing is the median of several runs after a warm-up.
Run: python benchmarks/bench_fused_moe.py [--tokens 1 64 512]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.ops.fused_moe import fused_moe

H, I, E, K = 2048, 768, 128, 8


def _time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _hf_block(wgu, wd, rw, dtype, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True)
    blk = Qwen3MoeSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    sd = blk.state_dict()
    with torch.no_grad():
        for n, p in sd.items():
            if "gate_up" in n:
                p.copy_(wgu)
            elif "down" in n:
                p.copy_(wd)
            elif "gate" in n:
                p.copy_(rw)
    return blk


def run(tokens=(1, 64, 512), dtype=torch.bfloat16, reps=5):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rw = torch.randn(E, H, generator=g).to(dtype).to(device)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype).to(device)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype).to(device)
    try:
        hf = _hf_block(wgu, wd, rw, dtype, device)
    except Exception as exc:  # transformers layout changed: report, keep measuring ours
        print("transformers block unavailable:", exc)
        hf = None
    rows = []
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, H, generator=g).to(dtype).to(device)
            out, _ = fused_moe(x, rw, wgu, wd, K, True)
            ref, _ = reference.sparse_moe_block(x.float(), rw.float(), wgu.float(), wd.float(), K, True)
            err = (out.float() - ref).abs().max().item()
            t_f = _time(lambda: fused_moe(x, rw, wgu, wd, K, True), reps)
            t_r = _time(lambda: reference.sparse_moe_block(x, rw, wgu, wd, K, True), reps)
            t_h = _time(lambda: hf(x[None]), reps) if hf is not None else float("nan")
            flops = 6 * T * K * H * I
            rows.append(dict(T=T, fused_ms=t_f * 1e3, ref_ms=t_r * 1e3, hf_ms=t_h * 1e3, max_err=err,
                             gflops=flops / t_f / 1e9))
            print(f"T={T:6d} fused {t_f*1e3:9.2f} ms  reference {t_r*1e3:9.2f} ms  transformers {t_h*1e3:9.2f} ms  "
                  f"ref/fused {t_r/t_f:5.2f}x  hf/fused {t_h/t_f:5.2f}x  {flops/t_f/1e9:7.1f} GFLOP/s  err {err:.3g}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    a = ap.parse_args()
    print("cpu capability:", torch.backends.cpu.get_cpu_capability())
    try:
        print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].split("\n")[0].strip())
    except Exception:
        pass
    toks = a.tokens or ((1, 8, 64, 512, 4096, 16384) if torch.cuda.is_available() else (1, 64, 512))
    run(toks)
