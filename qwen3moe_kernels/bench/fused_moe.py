"""The sparse MoE block (the ``fused_moe`` op), forward and forward + backward, against the reference and
transformers' ``Qwen3MoeSparseMoeBlock`` on the same weights and inputs, at the Qwen3-30B-A3B shapes.

Layouts: x [T, H]; router_weight [E, H]; w_gate_up [E, 2I, H]; w_down [E, H, I]. Forward rows are op
"fused_moe", forward + backward rows "fused_moe fwd+bwd" (gradients of x and the expert weights; the router is
frozen). On a CPU the forward also times the machine's limits interleaved with the implementations at every T
(rows "cpu_limit": the read bandwidth of an fp32 sum over 512 MB, the torch.mm rate at M=512) and reports each row's
hit-expert weight GB/s as a fraction of that bandwidth and its FLOP rate as a fraction of that mm rate. ``benchmarks/README.md`` lists the
implementations and how their results are checked and timed.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ops, recorder, reference, roofline
from .checks import check_moe_block, max_abs_err, router_tied_tokens
from .machine import DEFAULT_TOKENS, cpu_mm_probe, cpu_read_probe, default_dtype, device_peak, dtype_name
from .report import add_ratios, add_rates, last_implementations
from .timing import cuda_graphed, peak_memory_fwd_bwd, time_interleaved

# Qwen3-30B-A3B MoE layer shapes (config.json of the released checkpoint)
QWEN3_30B_A3B = {"hidden": 2048, "moe_intermediate": 768, "experts": 128, "top_k": 8}

# transformers' block with our experts: what from_pretrained(..., experts_implementation="qwen3moe_kernels") runs
REGISTERED_EXPERTS = "transformers-qwen3moe_kernels"
IMPLS = ["fused", "eager", "transformers-eager", "transformers-grouped_mm", REGISTERED_EXPERTS]
FWD_BWD_IMPLS = ["fused", "eager", "transformers-eager", "transformers-grouped_mm"]
# On CUDA also timed as CUDA-graph replays (rows impl + GRAPHED): no host synchronisation in their forward,
# where the eager loops look up the experts hit on the host.
GRAPHED = "+cuda_graph"
GRAPH_IMPLS = ("fused", REGISTERED_EXPERTS, "transformers-grouped_mm")


def make_moe_weights(hidden: int, inter: int, experts: int, dtype: torch.dtype, device: str | torch.device,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random router_weight, w_gate_up and w_down, scaled like a trained layer (unit-variance x in, O(1) out)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        # generated in chunks along dim 0 so a 1.2 GB bf16 tensor never needs a 2.4 GB fp32 twin
        out = torch.empty(shape, dtype=dtype, device=device)
        for i in range(0, shape[0], 8):
            out[i : i + 8] = (torch.randn((min(8, shape[0] - i), *shape[1:]), generator=g) * scale).to(dtype)
        return out

    return {
        "router_weight": rnd(experts, hidden, scale=hidden**-0.5),
        "w_gate_up": rnd(experts, 2 * inter, hidden, scale=hidden**-0.5),
        "w_down": rnd(experts, hidden, inter, scale=inter**-0.5),
    }


def moe_block_cost(T: int, shapes: dict[str, int], dtype: torch.dtype) -> tuple[float | None, float | None, str | None]:
    """(FLOPs, bytes, model name) of one forward from ``roofline.op_cost("fused_moe", ...)``, the project's one cost
    model; shapes of no model in ``roofline.MODELS`` (``--quick``'s 16 experts) get None: no rates."""
    want = (shapes["hidden"], shapes["moe_intermediate"], shapes["experts"], shapes["top_k"])
    for name, m in roofline.MODELS.items():
        if (m["hidden"], m["inter"], m["experts"], m["top_k"]) == want:
            flops, nbytes = roofline.op_cost("fused_moe", name, T, dtype_name(dtype))
            return flops, nbytes, name
    return None, None, None


def transformers_block(weights: dict[str, torch.Tensor], top_k: int, experts_implementation: str):
    """transformers' ``Qwen3MoeSparseMoeBlock`` over ``weights`` (built on the meta device: no copy), frozen."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, two_i, H = weights["w_gate_up"].shape
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E, num_experts_per_tok=top_k,
                         norm_topk_prob=True, experts_implementation=experts_implementation)
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(cfg)
    block.gate.weight = torch.nn.Parameter(weights["router_weight"], requires_grad=False)
    block.experts.gate_up_proj = torch.nn.Parameter(weights["w_gate_up"], requires_grad=False)
    block.experts.down_proj = torch.nn.Parameter(weights["w_down"], requires_grad=False)
    return block.eval()


def _hf_block(name: str, weights: dict[str, torch.Tensor], top_k: int):
    if name == REGISTERED_EXPERTS:
        from ..integrations.transformers import register

        return transformers_block(weights, top_k, register())
    if name.startswith("transformers-"):
        return transformers_block(weights, top_k, name.split("-", 1)[1])
    raise ValueError(f"unknown fused_moe implementation {name!r}; choose from {IMPLS}")


def implementation(name: str, weights: dict[str, torch.Tensor], top_k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(x [T, H]) -> out [T, H]`` of one of :data:`IMPLS`. Raises where transformers or its mode is missing."""
    w = weights
    if name == "fused":
        return lambda x: ops.fused_moe(x, w["router_weight"], w["w_gate_up"], w["w_down"], top_k, True)[0]
    if name == "eager":
        return lambda x: reference.fused_moe(x, w["router_weight"], w["w_gate_up"], w["w_down"], top_k, True)[0]
    block = _hf_block(name, w, top_k)
    return lambda x: block(x[None])[0]


def _check_row(row: dict, out: torch.Tensor, x: torch.Tensor, weights: dict, top_k: int, ref: torch.Tensor) -> bool:
    err, bound, ok = check_moe_block(out, x, weights, top_k, ref)
    row.update(max_err=err, tol=bound, check="pass" if ok else "FAIL")
    if not ok:
        row["error"] = f"wrong result: max error {err:.3e} > {bound:.3e}; not timed"
    return ok


# ------------------------------------------------------------------------------------------ forward


def cpu_limit_fns(dtype: torch.dtype) -> tuple[dict[str, Callable], dict[str, dict[str, Any]]]:
    """The CPU's limits as timed functions of the block's argument (ignored), to time interleaved with the block's
    implementations at every T: read bandwidth (fp32 sum over 512 MB) and the torch.mm rate at M=512 in ``dtype``
    (``machine.cpu_read_probe`` / ``cpu_mm_probe``); and the fields of their rows (op "cpu_limit")."""
    read, nbytes = cpu_read_probe()
    mm, flops = cpu_mm_probe(dtype)
    fns = {"read": lambda x: read(), "mm": lambda x: mm()}
    rows = {"read": dict(op="cpu_limit", impl="read: fp32 sum over 512 MB", dtype="fp32", bytes=nbytes),
            "mm": dict(op="cpu_limit", impl="mm: torch.mm M=512 N=1536 K=2048", dtype=dtype_name(dtype), flops=flops)}
    return fns, rows


def add_limit_fractions(rows: list[dict[str, Any]], read: dict[str, Any], mm: dict[str, Any]) -> None:
    """Each timed block row's hit-expert weight GB/s as a % of the read bandwidth measured with it
    (``frac_read_bw``) and its GFLOP/s as a % of the mm rate measured with it (``frac_mm``)."""
    for r in rows:
        if not r.get("median_ms"):
            continue
        if r.get("weight_bytes"):
            r["weight_gbps"] = r["weight_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            if read.get("gbps"):
                r["frac_read_bw"] = 100.0 * r["weight_gbps"] / read["gbps"]
        if r.get("tflops") and mm.get("tflops"):
            r["frac_mm"] = 100.0 * r["tflops"] / mm["tflops"]


def run_forward(device: str | torch.device = "cpu", token_counts: Sequence[int] | None = None,
                dtype: torch.dtype | None = None, shapes: dict[str, int] | None = None,
                impls: Sequence[str] | None = None, n_inputs: int = 3, budget_s: float = 1.5, min_runs: int = 5,
                memory: bool = True, graphs: bool = True, weights: dict | None = None, limits: bool = True,
                log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """One row per (T, implementation of ``impls``, default all that run here), op "fused_moe". On CUDA also
    ``GRAPH_IMPLS`` as CUDA-graph replays (``graphs``) and each implementation's forward + backward peak memory
    (``memory``); on a CPU (``limits``) the "cpu_limit" rows of every T, timed with it, and each row's fractions.
    ``shapes`` overrides :data:`QWEN3_30B_A3B`."""
    device = torch.device(device)
    shapes = dict(QWEN3_30B_A3B, **(shapes or {}))
    H, I, E, k = shapes["hidden"], shapes["moe_intermediate"], shapes["experts"], shapes["top_k"]
    dtype = dtype or default_dtype(device)
    token_counts = token_counts or DEFAULT_TOKENS.get(device.type, DEFAULT_TOKENS["cuda"])
    weights = weights or make_moe_weights(H, I, E, dtype, device)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in impls or IMPLS:
        if name not in IMPLS:
            raise ValueError(f"unknown fused_moe implementation {name!r}; choose from {IMPLS}")
        try:
            fns[name] = implementation(name, weights, k)
        except Exception as exc:  # transformers missing, or this mode not available here: the others still run
            if log:
                log(f"fused_moe: skipping {name}: {type(exc).__name__}: {exc}")
    peak = device_peak(device, dtype)
    results: list[dict[str, Any]] = []
    limit_fns, limit_fields = cpu_limit_fns(dtype) if limits and device.type == "cpu" else ({}, {})
    expert_bytes = 3 * H * I * torch.empty((), dtype=dtype).element_size()  # gate, up and down rows of one expert
    g = torch.Generator(device="cpu").manual_seed(1234)
    for T in token_counts:
        xs = [torch.randn(T, H, generator=g).to(device=device, dtype=dtype) for _ in range(n_inputs)]
        with torch.inference_mode():
            ref = reference.fused_moe(xs[0], weights["router_weight"], weights["w_gate_up"], weights["w_down"], k,
                                      True)[0]
            ids = reference.router_topk(F.linear(xs[0], weights["router_weight"]), k, True)[1]
            tied = int(router_tied_tokens(xs[0], weights["router_weight"], k).sum())
            # the distinct experts each input set hits (its routing differs), for the weight bytes a call must read
            hits = [int(torch.unique(reference.router_topk(F.linear(x, weights["router_weight"]), k, True)[1]).numel())
                    for x in xs]
        flops, nbytes, cost_model = moe_block_cost(T, shapes, dtype)
        base = {"op": "fused_moe", "tokens": T, "dtype": dtype_name(dtype), "shape": f"H={H} I={I} E={E} k={k}",
                "device": str(device), "flops": flops, "bytes": nbytes, "cost_model": cost_model,
                "active_experts": int(torch.unique(ids).numel()), "router_tied_tokens": tied,
                "weight_bytes": expert_bytes * sum(hits) / len(hits)}
        rows: dict[str, dict[str, Any]] = {}
        ok_fns: dict[str, Callable] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", recorder.FallbackWarning)
            for name, fn in fns.items():  # 1. check every implementation: a wrong one gets no number
                row = rows[name] = dict(base, impl=name)
                try:
                    recorder.reset()
                    with torch.inference_mode():
                        out = fn(xs[0])
                    if _check_row(row, out, xs[0], weights, k, ref):
                        ok_fns[name] = fn
                    if name in ("fused", REGISTERED_EXPERTS):
                        row["ran"] = last_implementations()
                except Exception as exc:  # one broken implementation must not hide the others' numbers
                    row["error"] = f"{type(exc).__name__}: {exc}"
            if graphs and device.type == "cuda":  # 1b. the graph replays, checked the same way
                for name in [n for n in GRAPH_IMPLS if n in ok_fns]:
                    row = rows[name + GRAPHED] = dict(rows[name], impl=name + GRAPHED)
                    try:
                        replay = cuda_graphed(fns[name], [(x,) for x in xs])
                        if _check_row(row, replay(xs[0]), xs[0], weights, k, ref):
                            ok_fns[name + GRAPHED] = replay
                    except Exception as exc:
                        row["error"] = f"not capturable: {type(exc).__name__}: {exc}"
            # 2. time the correct ones interleaved: load on a shared machine hits all of them alike (the CPU's
            # limits too, so each T's fractions are of the limits measured with it)
            try:
                timed = time_interleaved({**ok_fns, **{"cpu_limit " + n: f for n, f in limit_fns.items()}},
                                         [(x,) for x in xs], device, budget_s=budget_s, min_runs=min_runs)
            except Exception as exc:
                timed = {}
                for name in ok_fns:
                    rows[name]["error"] = f"timing failed: {type(exc).__name__}: {exc}"
        limits_t = {}
        for n, fields in limit_fields.items():
            if "cpu_limit " + n in timed:
                limits_t[n] = dict(fields, tokens=T, device=str(device), **timed.pop("cpu_limit " + n))
                add_rates(limits_t[n], fields.get("flops"), fields.get("bytes"), None)
                results.append(limits_t[n])
        for name, stats in timed.items():
            rows[name].update(stats)
            add_rates(rows[name], flops, nbytes, peak)
            if memory and device.type == "cuda" and not name.endswith(GRAPHED):
                rows[name]["peak_mem_gib"] = _fwd_bwd_memory(name, weights, k, xs[0], device)
        if limits_t:
            add_limit_fractions(list(rows.values()), limits_t.get("read", {}), limits_t.get("mm", {}))
        for name, row in rows.items():
            results.append(row)
            if log:
                log(f"  fused_moe T={T:<5} {name:<30} "
                    + (f"{row['median_ms']:.3f} ms" if row.get("median_ms") else row.get("error", "")))
        if log and limits_t:
            log(f"  cpu limits T={T:<5} read {limits_t['read'].get('gbps', 0):.1f} GB/s, mm "
                f"{1e3 * limits_t['mm'].get('tflops', 0):.1f} GFLOP/s")
    add_ratios(results)
    return results


def _fwd_bwd_memory(name: str, weights: dict, top_k: int, x: torch.Tensor, device) -> float | None:
    """Forward + backward peak memory of the block with trainable weights (a training step's footprint)."""
    try:
        fn, _ = fwd_bwd_implementation(name, weights, top_k)
        xg = x.detach().requires_grad_(True)
        return peak_memory_fwd_bwd(lambda: fn(xg), device)
    except Exception:  # no backward for this path: the table shows '-'
        return None


# ------------------------------------------------------------------------------- forward + backward


def fwd_bwd_implementation(name: str, weights: dict[str, torch.Tensor],
                           top_k: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """``(fn(x) -> out, trainable expert weights)`` of one of :data:`IMPLS` over aliases of ``weights`` whose
    w_gate_up and w_down require a gradient (``weights`` themselves are left as they are)."""
    w = {n: t.detach() for n, t in weights.items()}
    if name in ("fused", "eager"):
        fn, params = implementation(name, w, top_k), [w["w_gate_up"], w["w_down"]]
    else:  # transformers' block makes its own Parameters over the same storage
        block = _hf_block(name, w, top_k)
        fn, params = (lambda x: block(x[None])[0]), [block.experts.gate_up_proj, block.experts.down_proj]
    for p in params:
        p.requires_grad_(True)
    return fn, params


def fwd_bwd_call(fn: Callable, params: Sequence[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One timed call: forward, then backward of ``mean(out^2)``; returns (out, dx)."""
    x = x.detach().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(x)
    out.float().square().mean().backward()
    return out, x.grad


def fwd_bwd_reference(x: torch.Tensor, weights: dict, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, dx) of the experts in fp32 on this dtype's routing: bf16 logits may pick other experts at near-ties,
    which is routing, not the experts' arithmetic."""
    with torch.no_grad():
        routing, ids = reference.router_topk(F.linear(x, weights["router_weight"]), top_k, True)
    x32 = x.detach().float().requires_grad_()
    out = reference.moe_experts(x32, weights["w_gate_up"].detach().float(), weights["w_down"].detach().float(), ids,
                                routing)
    out.square().mean().backward()
    return out.detach(), x32.grad


def fwd_bwd_bounds(eager: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> list[float]:
    """The allowed error of (out, dx): twice the eager reference's own error against fp32, plus 1e-3 of the scale."""
    return [2 * max_abs_err(e, r) + 1e-3 * r.abs().max().item() for e, r in zip(eager, ref)]


def run_fwd_bwd(device: str | torch.device = "cpu", token_counts: Sequence[int] | None = None,
                dtype: torch.dtype | None = None, shapes: dict[str, int] | None = None, budget_s: float = 1.5,
                min_runs: int = 5, n_inputs: int = 3, weights: dict | None = None,
                log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """One row per (T, implementation of :data:`FWD_BWD_IMPLS` that runs here), op "fused_moe fwd+bwd"."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    token_counts = token_counts or DEFAULT_TOKENS.get(device.type, DEFAULT_TOKENS["cuda"])
    s = dict(QWEN3_30B_A3B, **(shapes or {}))
    H, I, E, k = s["hidden"], s["moe_intermediate"], s["experts"], s["top_k"]
    weights = weights or make_moe_weights(H, I, E, dtype, device)
    impls = {}
    for name in FWD_BWD_IMPLS:
        try:
            impls[name] = fwd_bwd_implementation(name, weights, k)
        except Exception as exc:  # transformers missing or the mode unavailable: report, keep measuring ours
            if log:
                log(f"fused_moe fwd+bwd: skipping {name}: {type(exc).__name__}: {exc}")
    rows = []
    g = torch.Generator().manual_seed(1)
    for T in token_counts:
        xs = [torch.randn(T, H, generator=g).to(device, dtype) for _ in range(n_inputs)]
        ref = fwd_bwd_reference(xs[0], weights, k)
        # the experts' FLOPs, 6*T*k*H*I per forward, 3x that for forward + backward
        base = {"op": "fused_moe fwd+bwd", "tokens": T, "dtype": dtype_name(dtype), "device": str(device),
                "shape": f"H={H} I={I} E={E} k={k}", "flops": 18.0 * T * k * H * I}
        got, outs = {}, {}
        for name, (fn, params) in impls.items():  # check (and warm up) every implementation
            row = got[name] = dict(base, impl=name)
            try:
                recorder.reset()
                outs[name] = fwd_bwd_call(fn, params, xs[0])
                if name == "fused":
                    row["ran"] = last_implementations()
                row["max_err"] = max_abs_err(outs[name][0], ref[0])
            except Exception as exc:  # one broken implementation must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"
        if "eager" not in outs:
            for row in got.values():
                row.setdefault("error", "the eager reference failed: nothing to check against; not timed")
        else:
            bounds = fwd_bwd_bounds(outs["eager"], ref)
            for name, row in got.items():
                if "error" in row:
                    continue
                errs = [max_abs_err(o, r) for o, r in zip(outs[name], ref)]
                bad = [what for what, e, b in zip(("output", "dx"), errs, bounds) if e > b]
                row.update(tol=bounds[0], check="FAIL" if bad else "pass")
                if bad:
                    row["error"] = f"wrong {' and '.join(bad)}: error {errs} > allowed {bounds}; not timed"
        # the check was the warm-up; then interleaved rounds with autograd on
        ok = {name: (lambda x, fn=fn, params=params: fwd_bwd_call(fn, params, x))
              for name, (fn, params) in impls.items() if "error" not in got[name]}
        times = time_interleaved(ok, [(x,) for x in xs], device, warmup=0, min_runs=min_runs, budget_s=budget_s,
                                 inference=False)
        for name, row in got.items():
            if name in times:
                row.update(times[name])
                add_rates(row, row["flops"], None, None)
            rows.append(row)
        if log:
            log(f"  fused_moe fwd+bwd T={T:<5} median ms: " + "  ".join(
                f"{n} {r['median_ms']:.2f}" if "median_ms" in r else f"{n} ERROR" for n, r in got.items()))
    add_ratios(rows)
    return rows


def run(device: str | torch.device, token_counts: Sequence[int], dtype: torch.dtype | None = None,
        shapes: dict[str, int] | None = None, backward: bool = True, budget_s: float = 1.5, min_runs: int = 5,
        log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """The forward rows, then (``backward``) the forward + backward rows, on the same weights."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    s = dict(QWEN3_30B_A3B, **(shapes or {}))
    weights = make_moe_weights(s["hidden"], s["moe_intermediate"], s["experts"], dtype, device)
    rows = run_forward(device, token_counts, dtype, s, budget_s=budget_s, min_runs=min_runs, weights=weights, log=log)
    if backward:
        rows += run_fwd_bwd(device, token_counts, dtype, s, budget_s=budget_s, min_runs=min_runs, weights=weights,
                            log=log)
    return rows


# ------------------------------------------------------------------------------------------- command line

MODEL_SHAPES = {"30b": QWEN3_30B_A3B, "235b": {"hidden": 4096, "moe_intermediate": 1536, "experts": 128, "top_k": 8}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwen3moe_kernels.bench.fused_moe``: the block's forward rows (and on a CPU its limits) for one
    dtype and model shape, printed and saved with the machine record. Threads: ``OMP_NUM_THREADS``."""
    import argparse
    from pathlib import Path

    from .machine import DTYPES, device_label, machine_info
    from .report import bench_table, save_json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU; on CPU by capability")
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="30b", help="layer shapes (default 30b)")
    p.add_argument("--impls", help=f"comma-separated from {', '.join(IMPLS)} (default all)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per implementation and T")
    p.add_argument("--out", help="JSON path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else DEFAULT_TOKENS[device.type]
    info = machine_info(device)
    print(f"fused_moe on {device_label(info)}, {dtype_name(dtype)}, {args.model} shapes {MODEL_SHAPES[args.model]}")
    rows = run_forward(device, tokens, dtype, MODEL_SHAPES[args.model], impls=args.impls.split(",") if args.impls
                       else None, budget_s=args.budget)
    print(bench_table(rows))
    if args.out:
        save_json(Path(args.out), rows, info, {"command": "bench.fused_moe", "argv": list(argv or []), "model":
                                                args.model, "shapes": MODEL_SHAPES[args.model],
                                                "dtype": dtype_name(dtype), "tokens": tokens})
        print(f"saved {args.out}")
    return 1 if any(r.get("error") or r.get("check") == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
