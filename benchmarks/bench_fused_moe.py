"""Forward + backward of the whole sparse MoE block: ``ops.fused_moe`` against ``reference.sparse_moe_block`` and
transformers' ``Qwen3MoeSparseMoeBlock`` (experts "eager" and "grouped_mm"), at the Qwen3-30B-A3B shapes
(H=2048, I=768, E=128, k=8), on the same weights and inputs.

One timed call is a training step's share of the block: forward, then backward of ``mean(out^2)`` to x and the
expert weights (``w_gate_up``, ``w_down``: trainable in every implementation, the router frozen). transformers'
blocks are built over the same weight storage with their experts' Parameters requiring a gradient.
``backward=False`` (``--forward-only``) times the forward alone; the forward is also ``bench_moe_block.py``'s.

Before timing, each implementation's output and gradient of x are checked against an fp32 reference on the same
routing (the routing of this dtype's logits): at most twice the error of the reference run in this dtype, plus
1e-3 of the reference's scale (the flash-attention rule). A failing implementation gets an ``error`` and no time.
The implementations are timed in interleaved rounds (``bench.time_interleaved``: one call of each per round, 3
input sets rotated, at least ``min_runs`` calls and more up to ``budget_s`` of timed work each), so a noisy shared
machine slows all of them alike. TFLOP/s counts the experts' 6*T*k*H*I per forward (3x that for
forward + backward).

At the 30B-A3B shapes on a CPU the eager loops' backward is slow: autograd of each ``w[e]`` slice writes a dense
[E, 2I, H] gradient per expert hit (measured here, bf16, 1 thread, one call: reference 10 s and transformers-eager
18 s at T=1, about 180 s at T=64; fused 2.1-2.3 s, transformers-grouped_mm 1.1-3.2 s). So the default CPU run of
``qwen3moe-kernels bench`` leaves this benchmark out (``--ops fused_moe`` or ``--ops all`` runs it, ``--quick``
at 16 experts); on a GPU it is in the default run.

On a CPU shared with other busy processes, every GEMM's OpenMP region can stall for a scheduler quantum
waiting for its second thread (seen here: 8.00 ms per tiny GEMM at 2 threads against 0.4 ms at 1), which
swamps the per-expert loops of all implementations alike; ``--threads 1`` measures the code, not the neighbours.

    python benchmarks/bench_fused_moe.py [--device cpu] [--tokens 1 8 64 512] [--forward-only] [--rounds 5]
                                         [--budget 1.5] [--threads 1] [--json PATH]
    qwen3moe-kernels bench --ops fused_moe                 # the table (calls run())
    pytest benchmarks/bench_fused_moe.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3moe_kernels import bench, dispatch, reference  # noqa: E402
from qwen3moe_kernels.ops.fused_moe import fused_moe  # noqa: E402

IMPLS = ["fused", "eager", "transformers-eager", "transformers-grouped_mm"]


def implementations(w: dict, top_k: int, backward: bool, log=print) -> dict:
    """``name -> (fn(x) -> out, trainable tensors)``; a transformers mode that cannot be built here is skipped."""
    ours = [w["w_gate_up"], w["w_down"]]
    for t in ours:
        t.requires_grad_(backward)
    impls = {
        "fused": (lambda x: fused_moe(x, w["router_weight"], w["w_gate_up"], w["w_down"], top_k, True)[0], ours),
        "eager": (lambda x: reference.sparse_moe_block(x, w["router_weight"], w["w_gate_up"], w["w_down"], top_k,
                                                       True)[0], ours),
    }
    for mode in ("eager", "grouped_mm"):
        try:  # transformers' block over the same storage (no copy), with its own Parameters
            block = bench.transformers_block({n: t.detach() for n, t in w.items()}, top_k, mode)
        except Exception as exc:  # transformers missing or the mode unavailable: report, keep measuring ours
            if log:
                log(f"fused_moe: skipping transformers-{mode}: {type(exc).__name__}: {exc}")
            continue
        params = [block.experts.gate_up_proj, block.experts.down_proj]
        for p in params:
            p.requires_grad_(backward)
        impls[f"transformers-{mode}"] = ((lambda b: lambda x: b(x[None])[0])(block), params)
    return impls


def call(fn, params, x, backward: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timed call: forward (no autograd), or forward + backward; returns (out, dx or None)."""
    if not backward:
        with torch.no_grad():
            return fn(x), None
    x = x.detach().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(x)
    out.float().square().mean().backward()
    return out, x.grad


def _fp32_reference(x, w, top_k, backward):
    """fp32 experts on this dtype's routing (bf16 logits may pick other experts at near-ties: routing, not the
    experts' arithmetic); returns (out, dx or None)."""
    with torch.no_grad():
        rweights, ids = reference.router_topk(torch.nn.functional.linear(x, w["router_weight"]), top_k, True)
    x32 = x.detach().float().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = reference.moe_experts(x32, ids, rweights, w["w_gate_up"].detach().float(), w["w_down"].detach().float())
        if backward:
            out.square().mean().backward()
    return out.detach(), x32.grad


def run(device, token_counts, dtype=None, shapes=None, backward: bool = True, budget_s: float = 1.5,
        min_runs: int = 5, n_inputs: int = 3, log=print):
    """Plain entry point (also for ``qwen3moe-kernels bench``): one row per (token count, implementation),
    op ``"moe_block fwd+bwd"`` (``"moe_block fwd"`` with ``backward=False``). ``shapes`` overrides
    ``bench.QWEN3_30B_A3B`` (hidden, moe_intermediate, experts, top_k)."""
    device = torch.device(device)
    if dtype is None:
        dtype = bench.cpu_bench_dtype()[0] if device.type == "cpu" else torch.bfloat16
    s = dict(bench.QWEN3_30B_A3B, **(shapes or {}))
    H, I, E, k = s["hidden"], s["moe_intermediate"], s["experts"], s["top_k"]
    op = "moe_block fwd+bwd" if backward else "moe_block fwd"
    w = bench.make_moe_weights(H, I, E, dtype, device)
    impls = implementations(w, k, backward, log)
    rows = []
    g = torch.Generator().manual_seed(1)
    for T in token_counts:
        xs = [torch.randn(T, H, generator=g).to(device, dtype) for _ in range(n_inputs)]
        ref_out, ref_dx = _fp32_reference(xs[0], w, k, backward)
        base = {"op": op, "tokens": T, "dtype": bench.dtype_name(dtype), "device": str(device),
                "shape": f"H={H} I={I} E={E} k={k}", "flops": 6.0 * T * k * H * I * (3 if backward else 1)}
        errs, got = {}, {}
        for name, (fn, params) in impls.items():  # check (and warm up) every implementation
            row = got[name] = dict(base, impl=name)
            try:
                dispatch.reset()
                out, dx = call(fn, params, xs[0], backward)
                if name == "fused":
                    row["ran"] = bench.last_implementations()
                errs[name] = [bench.max_abs_err(out, ref_out)] + ([bench.max_abs_err(dx, ref_dx)] if backward else [])
                row["max_err"] = errs[name][0]
            except Exception as exc:  # one broken implementation must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"
        if "eager" not in errs:
            for row in got.values():
                row.setdefault("error", "the eager reference failed: nothing to check against; not timed")
        else:
            scales = [ref_out.abs().max().item()] + ([ref_dx.abs().max().item()] if backward else [])
            bounds = [2 * e + 1e-3 * sc for e, sc in zip(errs["eager"], scales)]
            for name, row in got.items():
                bad = [what for what, e, b in zip(("output", "dx"), errs.get(name, []), bounds) if e > b]
                if bad and "error" not in row:
                    row["error"] = f"wrong {' and '.join(bad)}: error {errs[name]} > allowed {bounds}; not timed"
        # the check was the warm-up; then interleaved rounds (autograd on for forward + backward)
        ok = {name: (lambda x, fn=fn, params=params: call(fn, params, x, backward))
              for name, (fn, params) in impls.items() if "error" not in got[name]}
        times = bench.time_interleaved(ok, [(x,) for x in xs], device, warmup=0, min_runs=min_runs,
                                       budget_s=budget_s, inference=not backward)
        for name, row in got.items():
            if name in times:
                row.update(times[name])
                bench.add_rates(row, row["flops"], None, None)
            rows.append(row)
        if log:
            line = "  ".join(f"{n} {got[n]['median_ms']:.2f}" if "median_ms" in got[n] else f"{n} ERROR"
                             for n in got)
            log(f"  {op} T={T:<5} median ms: {line}")
    bench.add_ratios(rows)
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark

from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    s = bench.QWEN3_30B_A3B
    return bench.make_moe_weights(s["hidden"], s["moe_intermediate"], s["experts"], bench_dtype(), bench_device())


@pytest.mark.parametrize("tokens", bench_tokens())
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_moe_fwd_bwd(benchmark, weights, impl, tokens):
    device, dtype, s = torch.device(bench_device()), bench_dtype(), bench.QWEN3_30B_A3B
    w = weights
    impls = implementations(w, s["top_k"], True, log=None)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    fn, params = impls[impl]
    g = torch.Generator().manual_seed(tokens)
    xs = [torch.randn(tokens, s["hidden"], generator=g).to(device, dtype) for _ in range(3)]
    ref_out, ref_dx = _fp32_reference(xs[0], w, s["top_k"], True)
    (eager_out, eager_dx), (out, dx) = (call(*impls["eager"], xs[0], True), call(fn, params, xs[0], True))
    for what, got, low, ref in (("output", out, eager_out, ref_out), ("dx", dx, eager_dx, ref_dx)):
        err, bound = bench.max_abs_err(got, ref), 2 * bench.max_abs_err(low, ref) + 1e-3 * ref.abs().max().item()
        assert err <= bound, f"{impl} T={tokens}: {what} error {err:.3e} > allowed {bound:.3e}"
    bench.pedantic_rotating(benchmark, lambda x: call(fn, params, x, True), [(x,) for x in xs], device,
                            group=f"moe_block fwd+bwd T={tokens}", rounds=3 if tokens >= 512 else 10,
                            warmup_rounds=1, inference=False, impl=impl, tokens=tokens,
                            dtype=bench.dtype_name(dtype))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", choices=sorted(bench.DTYPES), default=None)
    ap.add_argument("--rounds", type=int, default=5, help="at least this many timed calls per implementation")
    ap.add_argument("--budget", type=float, default=1.5, help="then more, up to this many seconds each")
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone")
    ap.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared, oversubscribed machine 1 avoids OpenMP stalls)")
    ap.add_argument("--json", default=None, help="write the rows and the machine record here (bench.save_json)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = bench.machine_info(a.device)
    info["loadavg_before"] = os.getloadavg()
    print(f"cpu: {info['cpu_model']}, capability {info['cpu_capability']}, flags {info['cpu_flags']}, "
          f"threads {torch.get_num_threads()}, gpu {info['gpu']}, load {info['loadavg_before']}")
    toks = a.tokens or ((1, 8, 64, 512, 4096, 16384) if torch.device(a.device).type == "cuda" else (1, 8, 64, 512))
    rows = run(a.device, list(toks), bench.DTYPES[a.dtype] if a.dtype else None, backward=not a.forward_only,
               budget_s=a.budget, min_runs=a.rounds)
    info["loadavg_after"] = os.getloadavg()
    print(bench.bench_table(rows))
    if a.json:
        bench.save_json(a.json, rows, info, vars(a))
        print("wrote", a.json)
