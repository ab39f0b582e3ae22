"""Benchmark of the whole sparse MoE block: ``ops.fused_moe`` against ``reference.sparse_moe_block`` and
transformers' ``Qwen3MoeSparseMoeBlock`` (experts "eager", and "grouped_mm" on a GPU), at the Qwen3-30B-A3B
shapes (H=2048, I=768, E=128, k=8).

Forward at T in {1, 8, 64, 512} on CPU (plus 4096 and 16384 on a GPU); ``--backward`` adds forward+backward
(gradients of x and the expert weights). Every implementation's result is checked against the fp32 reference
before timing. The implementations are timed in interleaved rounds (one call of each per round, several input
sets rotated), so a noisy shared machine slows all of them alike; the report gives the median and the minimum
per implementation and the ratios of both. FLOP/s counts the experts' 6*T*k*H*I (forward). The machine record
(CPU model, ``get_cpu_capability()``, native bf16 or not, threads, load average; GPU name) is printed and
returned with the rows.

On a CPU shared with other busy processes, every GEMM's OpenMP region can stall for a scheduler quantum
waiting for its second thread (seen here: 8.00 ms per tiny GEMM at 2 threads against 0.4 ms at 1), which
swamps the per-expert loops of all three implementations alike; ``--threads 1`` measures the code, not the
neighbours.

Run: python benchmarks/bench_fused_moe.py [--tokens 1 8 64 512] [--backward] [--rounds 7] [--threads 1]
     [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from qwen3moe_kernels import bench, reference
from qwen3moe_kernels.ops.fused_moe import fused_moe

H, I, E, K = 2048, 768, 128, 8


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _impls(w, device):
    fns = {
        "fused": lambda x: fused_moe(x, w["rw"], w["wgu"], w["wd"], K, True)[0],
        "reference": lambda x: reference.sparse_moe_block(x, w["rw"], w["wgu"], w["wd"], K, True)[0],
    }
    for impl in ("eager",) + (("grouped_mm",) if device.type == "cuda" else ()):
        try:  # transformers' block sharing our weight tensors (no copy)
            blk = bench.transformers_block({"router_weight": w["rw"], "w_gate_up": w["wgu"], "w_down": w["wd"]},
                                           K, impl)
            fns[f"transformers-{impl}"] = (lambda b: (lambda x: _first(b(x[None]))[0]))(blk)
        except Exception as exc:  # transformers layout changed: report, keep measuring ours
            print(f"transformers {impl} block unavailable: {exc}")
    return fns


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _weights(dtype, device):
    g = torch.Generator().manual_seed(0)
    return {"rw": torch.randn(E, H, generator=g).to(dtype).to(device),
            "wgu": (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype).to(device),
            "wd": (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype).to(device)}


def _call(fn, x, w, backward):
    if not backward:
        with torch.no_grad():
            return fn(x)
    x = x.detach().requires_grad_()
    for t in (w["wgu"], w["wd"]):
        t.grad = None
    out = fn(x)
    out.float().square().mean().backward()
    return out


def run(tokens=(1, 8, 64, 512), dtype=None, rounds=7, n_inputs=3, backward=False, device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = bench.cpu_bench_dtype()[0] if device.type == "cpu" else torch.bfloat16
    info = bench.machine_info(device)
    info["native_bf16"] = bool({"avx512_bf16", "amx_bf16"} & set(info["cpu_flags"]))
    info["loadavg_before"] = os.getloadavg()
    w = _weights(dtype, device)
    if backward:
        w["wgu"].requires_grad_()
        w["wd"].requires_grad_()
    fns = _impls(w, device)
    if backward:  # transformers' block keeps its own parameters: time only ours and the reference
        fns = {n: f for n, f in fns.items() if not n.startswith("transformers")}
    rows = []
    g = torch.Generator().manual_seed(1)
    for T in tokens:
        xs = [torch.randn(T, H, generator=g).to(dtype).to(device) for _ in range(n_inputs)]
        with torch.no_grad():
            # fp32 experts on the routing this dtype's logits give (bf16 logits may pick other experts than fp32
            # logits at near-ties; that is routing, not the experts' arithmetic)
            rweights, ids = reference.router_topk(torch.nn.functional.linear(xs[0], w["rw"]), K, True)
            ref = reference.moe_experts(xs[0].float(), ids, rweights, w["wgu"].float(), w["wd"].float())
        errs = {}
        for name, fn in fns.items():
            errs[name] = (_call(fn, xs[0], w, backward).float() - ref).abs().max().item()  # check (and warm up)
        bound = 2 * errs["reference"] + 1e-3 * ref.abs().max().item()
        if errs["fused"] > bound:  # the flash-attention rule: at most twice the error of torch's own computation
            raise AssertionError(f"T={T}: fused error {errs['fused']:.3g} > 2x reference's {errs['reference']:.3g}")
        times = {name: [] for name in fns}
        for r in range(rounds):
            for name, fn in fns.items():
                x = xs[r % n_inputs]
                _sync(device)
                t0 = time.perf_counter()
                _call(fn, x, w, backward)
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
        flops = 6 * T * K * H * I * (3 if backward else 1)
        base = {s: f(times["reference"]) for s, f in (("median", statistics.median), ("min", min))}
        for name, ts in times.items():
            med, mn = statistics.median(ts), min(ts)
            rows.append(dict(T=T, impl=name, dtype=bench.dtype_name(dtype), backward=backward, median_ms=med,
                             min_ms=mn, ref_over_impl_median=base["median"] / med, ref_over_impl_min=base["min"] / mn,
                             gflops_median=flops / med / 1e6, max_err=errs[name]))
        fm = {r["impl"]: r for r in rows if r["T"] == T}
        line = "  ".join(f"{n} {fm[n]['median_ms']:8.1f} ({fm[n]['min_ms']:7.1f})" for n in fns)
        hf = fm.get("transformers-eager")
        ratio = f"  hf/fused {hf['median_ms'] / fm['fused']['median_ms']:5.2f}x" if hf else ""
        print(f"T={T:5d} {'fwd+bwd' if backward else 'fwd'} ms median (min): {line}  ref/fused "
              f"{fm['fused']['ref_over_impl_median']:5.2f}x ({fm['fused']['ref_over_impl_min']:.2f}x){ratio}  "
              f"fused {fm['fused']['gflops_median']:6.1f} GFLOP/s  err {fm['fused']['max_err']:.3g}")
    info["loadavg_after"] = os.getloadavg()
    return {"machine": info, "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared, oversubscribed machine 1 avoids OpenMP stalls)")
    ap.add_argument("--json", default=None, help="write the rows and the machine record here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = bench.machine_info("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cpu: {info['cpu_model']}, capability {info['cpu_capability']}, flags {info['cpu_flags']}, "
          f"threads {info['cpu_threads']}, gpu {info['gpu']}, load {os.getloadavg()}")
    toks = a.tokens or ((1, 8, 64, 512, 4096, 16384) if torch.cuda.is_available() else (1, 8, 64, 512))
    result = run(toks, rounds=a.rounds, backward=a.backward)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
        print("wrote", a.json)
