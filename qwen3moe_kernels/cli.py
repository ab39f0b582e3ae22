"""The ``qwen3moe-kernels`` console command.

    qwen3moe-kernels check            every public op (``qwen3moe_kernels.ops``) and any other op-module function
                                      named like a reference op, against the reference on this machine's device:
                                      max error, tolerance, pass/fail and the implementation that ran; exit status 1
                                      if anything fails
    qwen3moe-kernels bench            the benchmarks of ``qwen3moe_kernels.bench``: the Qwen3-30B-A3B sparse MoE
                                      block (fused_moe) and every op benchmark, at decode and prefill token counts,
                                      against the reference and transformers (on a CPU at full shapes without the
                                      block's slow forward + backward; --ops all adds it and the model benchmark);
                                      prints a table and saves JSON and a PNG plot; exit status 1 if any row has an
                                      error or a failed check
    qwen3moe-kernels compile-check    ahead-of-time compile of every shipped Triton kernel config for sm_90/sm_100
                                      (``qwen3moe_kernels.tools.compile_check``)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from . import ops, recorder, reference
from .bench import ep, fused_moe, model, moe_permute, rms_norm, rope, router_topk
from .bench.checks import close_bound, close_ok, experts_fp32, max_abs_err
from .bench.fused_moe import QWEN3_30B_A3B, make_moe_weights
from .bench.machine import DEFAULT_TOKENS, DTYPES, QUICK_TOKENS, cpu_bench_dtype, device_label, dtype_name, machine_info
from .bench.report import PEAK_NOTE, add_ratios, bench_table, format_table, last_implementations, plot, save_json
from .tolerances import TOL, twice_torch_error_bound

# ---------------------------------------------------------------------------------------------- check


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_check_dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16]
    # bf16 only where the CPU computes it natively: emulated bf16 GEMMs at 30B shapes would take minutes.
    lowp, _ = cpu_bench_dtype()
    return [torch.float32] + ([lowp] if lowp != torch.float32 else [])


class _Inputs:
    """Seeded random inputs at the Qwen3-30B-A3B shapes, made once per dtype and shared by every case."""

    def __init__(self, device: torch.device, tokens: int, seed: int = 0, shapes: dict | None = None):
        self.device, self.T = device, tokens
        s = dict(QWEN3_30B_A3B, **(shapes or {}))
        self.H, self.I, self.E, self.k = s["hidden"], s["moe_intermediate"], s["experts"], s["top_k"]
        self.D, self.Hq, self.Hk, self.theta, self.eps = 128, 32, 4, 1_000_000.0, 1e-6
        self._w32 = None
        self.seed = seed
        self._cache: dict[torch.dtype, dict[str, torch.Tensor]] = {}

    def get(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if dtype in self._cache:
            return self._cache[dtype]
        if self._w32 is None:
            self._w32 = make_moe_weights(self.H, self.I, self.E, torch.float32, self.device, seed=self.seed)
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        T, H, dev = self.T, self.H, self.device

        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=g) * scale).to(device=dev, dtype=dtype)

        d = {n: w.to(dtype) for n, w in self._w32.items()}
        d["x"] = rnd(T, H)
        d["residual"] = rnd(T, H)
        d["norm_weight"] = (1.0 + 0.1 * torch.randn(H, generator=g)).to(device=dev, dtype=dtype)
        d["q"] = rnd(1, T, self.Hq, self.D)
        d["k"] = rnd(1, T, self.Hk, self.D)
        d["q_weight"] = (1.0 + 0.1 * torch.randn(self.D, generator=g)).to(device=dev, dtype=dtype)
        d["k_weight"] = (1.0 + 0.1 * torch.randn(self.D, generator=g)).to(device=dev, dtype=dtype)
        pos = torch.arange(T, device=dev)[None] + 3  # not starting at 0, so position offsets are exercised
        d["cos"], d["sin"] = reference.rope_cos_sin(pos, self.D, self.theta, dtype)
        logits = torch.nn.functional.linear(d["x"], d["router_weight"])
        d["logits"] = logits
        d["topk_weights"], d["topk_ids"] = reference.router_topk(logits, self.k, True)
        d["sorted_slots"], d["inv"], d["offsets"] = reference.moe_sort(d["topk_ids"], self.E)
        d["y"] = rnd(T * self.k, H)
        d["gate_up"] = rnd(T * self.k, 2 * self.I)
        self._cache[dtype] = d
        return d


def _compare(out: Any, ref: Any, kind: str | None, dtype: torch.dtype, ref32: Any = None) -> tuple[float, float, bool]:
    """(max error, allowed error, ok) over every tensor of an output (tuples compared element by element).

    Integer outputs must match exactly. Float outputs use the table's ``kind`` tolerance against the reference in
    the same dtype, or, with ``ref32`` (an fp32 reference) in low precision, the twice-PyTorch's-error rule.
    """
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    r32s = ref32 if isinstance(ref32, (tuple, list)) else (ref32,) * len(refs)
    if len(outs) != len(refs):
        return float("inf"), 0.0, False
    worst_err, worst_bound, ok = 0.0, 0.0, True
    for o, r, r32 in zip(outs, refs, r32s):
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            return float("inf"), 0.0, False
        if not r.is_floating_point():
            err = float((o.long() - r.long()).abs().max().item()) if o.numel() else 0.0
            bound, good = 0.0, err == 0.0
        elif r32 is not None and dtype != torch.float32:
            err = max_abs_err(o, r32)
            bound = twice_torch_error_bound(r32, r)
            good = err <= bound
        else:
            k = kind if r.dtype == dtype else "router"  # fp32 outputs of a low-precision op (router weights)
            err = max_abs_err(o, r)
            bound = close_bound(r, k, r.dtype if r.dtype in TOL[k] else dtype)
            good = close_ok(o, r, k, r.dtype if r.dtype in TOL[k] else dtype)
        ok = ok and good and not (o.is_floating_point() and torch.isnan(o).any().item() and not torch.isnan(r).any().item())
        if err >= worst_err:
            worst_err, worst_bound = err, bound
    return worst_err, worst_bound, ok


class Case:
    """One op to check: ``run(inputs)`` returns (our output, reference output, fp32 reference or None)."""

    def __init__(self, op: str, kind: str, shape: Callable[[_Inputs], str], run: Callable):
        self.op, self.kind, self.shape, self.run = op, kind, shape, run


# Reference-spec arguments per op: ``ops.<name>`` takes the arguments of ``reference.<name>`` (the project's
# convention: every op is tested against the reference function of the same name). Value: (tolerance kind, shape
# text, builder of the positional arguments).
_OP_ARGS: dict[str, tuple[str, Callable[[_Inputs], str], Callable[[dict, _Inputs], tuple]]] = {
    "router_topk": ("router", lambda i: f"logits[{i.T},{i.E}] k={i.k}", lambda d, i: (d["logits"], i.k, True)),
    "moe_sort": ("exact", lambda i: f"ids[{i.T},{i.k}] E={i.E}", lambda d, i: (d["topk_ids"], i.E)),
    "moe_align_block": ("exact", lambda i: f"ids[{i.T},{i.k}] E={i.E} block=64",
                        lambda d, i: (d["topk_ids"], i.E, 64)),
    "moe_permute": ("exact", lambda i: f"x[{i.T},{i.H}] k={i.k}", lambda d, i: (d["x"], d["sorted_slots"], i.k)),
    "moe_unpermute": ("elementwise", lambda i: f"y[{i.T * i.k},{i.H}]",
                      lambda d, i: (d["y"], d["topk_weights"], d["inv"])),
    "swiglu": ("elementwise", lambda i: f"gate_up[{i.T * i.k},{2 * i.I}]", lambda d, i: (d["gate_up"],)),
    "moe_experts": ("gemm", lambda i: f"x[{i.T},{i.H}] E={i.E} I={i.I} k={i.k}",
                    lambda d, i: (d["x"], d["w_gate_up"], d["w_down"], d["topk_ids"], d["topk_weights"])),
    "rms_norm": ("elementwise", lambda i: f"x[{i.T},{i.H}]", lambda d, i: (d["x"], d["norm_weight"], i.eps)),
    "fused_add_rms_norm": ("elementwise", lambda i: f"x,res[{i.T},{i.H}]",
                           lambda d, i: (d["x"], d["residual"], d["norm_weight"], i.eps)),
    "rope": ("elementwise", lambda i: f"q[1,{i.T},{i.Hq},{i.D}] k[1,{i.T},{i.Hk},{i.D}]",
             lambda d, i: (d["q"], d["k"], d["cos"], d["sin"])),
    "qk_norm_rope": ("elementwise", lambda i: f"q[1,{i.T},{i.Hq},{i.D}] k[1,{i.T},{i.Hk},{i.D}]",
                     lambda d, i: (d["q"], d["k"], d["q_weight"], d["k_weight"], d["cos"], d["sin"], i.eps)),
}


# ops whose inputs are expert ids only: checked once, not once per float dtype
_INDEX_ONLY = {"moe_sort", "moe_align_block"}


# the public ops as ops/__init__ exports them (the ops.<name> cases check them; a module importing one is no new op)
_EXPORTED = {name: getattr(ops, name) for name in ops.__all__}


def discover_op_modules() -> list[str]:
    """The op modules of this install (``qwen3moe_kernels/ops/<stem>.py``)."""
    return sorted(m.name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_"))


def _run_case(name: str, kind: str, args: Callable, fn: Callable | None = None) -> Callable:
    """``run(d, inp)`` of the case ``name``: ``fn`` (default ``ops.<name>``, looked up when it runs) against
    ``reference.<name>``; gemm ops in low precision against the fp32 experts too."""

    def run(d, inp):
        a = args(d, inp)
        out = (fn or getattr(ops, name))(*a)
        ref = getattr(reference, name)(*a)
        ref32 = None
        if kind == "gemm" and d["x"].dtype != torch.float32:
            ref32 = experts_fp32(d["x"], d["w_gate_up"], d["w_down"], d["topk_ids"], d["topk_weights"])
            if name == "fused_moe":  # (out, router logits)
                ref32 = (ref32, ref[1].float())
        return out, ref, ref32

    return run


def _public_cases() -> list[Case]:
    """One case per public op of ``qwen3moe_kernels.ops`` that has a reference of the same name."""
    moe_args = lambda d, i: (d["x"], d["router_weight"], d["w_gate_up"], d["w_down"], i.k, True)  # noqa: E731
    cases = [Case("ops.fused_moe", "gemm", lambda i: f"x[{i.T},{i.H}] E={i.E} I={i.I} k={i.k}",
                  _run_case("fused_moe", "gemm", moe_args))]
    for name, (kind, shape, args) in _OP_ARGS.items():
        if name in ops.__all__:
            cases.append(Case(f"ops.{name}", kind, shape, _run_case(name, kind, args)))
    return cases


def _op_module_cases() -> list[Case]:
    """A case per function of an op module named like a reference op that is not a public op (checked above)
    nor the reference's own: what a module adds beside the public surface."""
    cases = []
    for stem in discover_op_modules():
        try:
            mod = importlib.import_module(f"qwen3moe_kernels.ops.{stem}")
        except Exception as exc:  # a broken op module is a failure of check, shown as one row
            cases.append(Case(f"ops.{stem}", "exact", lambda i: "-", _raiser(f"import failed: {exc!r}")))
            continue
        for name, (kind, shape, args) in _OP_ARGS.items():
            fn = getattr(mod, name, None)
            if callable(fn) and fn is not _EXPORTED.get(name) and fn is not getattr(reference, name, None):
                cases.append(Case(f"ops.{stem}.{name}", kind, shape, _run_case(name, kind, args, fn)))
    return cases


def _raiser(msg: str):
    def run(d, inp):
        raise RuntimeError(msg)

    return run


CHECK_COLUMNS = [
    ("op", "op", ""),
    ("dtype", "dtype", ""),
    ("shape", "shape", ""),
    ("max_err", "max abs err", ".2e"),
    ("tol", "tolerance", ".2e"),
    ("result", "result", ""),
    ("ran", "implementation that ran", ""),
]


def run_check(device: str, dtypes: list[torch.dtype], tokens: int, ops_filter: list[str] | None = None,
              shapes: dict | None = None) -> tuple[list[dict], list[str]]:
    dev = torch.device(device)
    inputs = _Inputs(dev, tokens, shapes=shapes)
    notes: list[str] = []
    cases = _public_cases() + _op_module_cases()
    if ops_filter:
        cases = [c for c in cases if any(f in c.op for f in ops_filter)]
    rows = []
    for n, dtype in enumerate(dtypes):
        d = inputs.get(dtype)
        for case in cases:
            index_only = case.op.rsplit(".", 1)[-1] in _INDEX_ONLY
            if index_only and n > 0:
                continue  # integer inputs: the same check whatever the float dtype
            row = {"op": case.op, "dtype": "int32" if index_only else dtype_name(dtype), "shape": case.shape(inputs)}
            recorder.reset()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", recorder.FallbackWarning)
                    out, ref, ref32 = case.run(d, inputs)
                err, bound, ok = _compare(out, ref, case.kind, dtype, ref32)
                row.update(max_err=err, tol=bound, result="pass" if ok else "FAIL")
                row["rule"] = "2x torch error vs fp32" if ref32 is not None else f"{case.kind} table"
            except Exception as exc:  # a crash is a failure, reported in the table rather than aborting the rest
                row.update(result="ERROR", error=f"{type(exc).__name__}: {exc}")
                row["trace"] = traceback.format_exc(limit=3)
            row["ran"] = last_implementations() if "error" not in row else row["error"][:120]
            rows.append(row)
    return rows, notes


def cmd_check(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    dev = torch.device(device)
    dtypes = [DTYPES[d] for d in args.dtype.split(",")] if args.dtype else _default_check_dtypes(dev)
    info = machine_info(dev)
    shapes = {"experts": 16, "top_k": 4} if args.quick else None
    tokens = args.tokens if args.tokens is not None else (16 if args.quick else 64)
    print(f"qwen3moe-kernels check on {device_label(info)}; torch {info['torch']}, triton {info['triton']}")
    what = ("Qwen3-30B-A3B (H=2048, I=768, E=128, top-8, head_dim 128, 32/4 heads)" if shapes is None
            else "--quick: Qwen3-30B-A3B widths with 16 experts, top-4")
    print(f"shapes: {what}, T={tokens}; dtypes: {', '.join(dtype_name(d) for d in dtypes)}")
    t0 = time.perf_counter()
    rows, notes = run_check(device, dtypes, tokens, args.ops.split(",") if args.ops else None, shapes)
    print()
    print(format_table(rows, CHECK_COLUMNS))
    for note in notes:
        print(f"note: {note}")
    bad = [r for r in rows if r["result"] != "pass"]
    for r in bad:
        if r.get("trace"):
            print(f"\n{r['op']} ({r['dtype']}):\n{r['trace']}")
    print(f"\n{len(rows) - len(bad)}/{len(rows)} passed in {time.perf_counter() - t0:.1f} s")
    if args.json:
        save_json(args.json, rows, info, {"command": "check", "tokens": tokens, "shapes": shapes})
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- bench


# stem -> benchmark module (its run(device, token_counts, dtype=None, ...) -> rows), in the order bench runs them
BENCHMARKS = {"fused_moe": fused_moe, "moe_permute": moe_permute, "rms_norm": rms_norm, "rope": rope,
              "router_topk": router_topk, "model": model}
# what ``--ops all`` adds to the default run: the model benchmark takes minutes anywhere
ON_REQUEST = ("model",)
# benchmarks that start processes of their own, run only when named (``--ops ep``): expert parallelism over gloo
NAMED_ONLY = {"ep": ep}


def select_benchmarks(device: str, quick_shapes: bool, ops_arg: str | None) -> tuple[list[str], bool, list[str]]:
    """(stems to run, whether fused_moe includes its forward + backward, notes) for ``--ops ops_arg``.

    Default: every benchmark but the model's; on a CPU at full shapes without the block's forward + backward,
    whose eager baselines take seconds to minutes per call there. ``all``: everything. Stems named: those, with
    the forward + backward.
    """
    asked = [o.strip() for o in (ops_arg or "").split(",") if o.strip()]
    if asked and asked != ["all"]:
        return asked, True, []
    wanted = [stem for stem in BENCHMARKS if stem not in ON_REQUEST or asked == ["all"]]
    if not asked and torch.device(device).type == "cpu" and not quick_shapes:
        return wanted, False, ["fused_moe fwd+bwd (the block's forward + backward) is left out of the default CPU "
                               "run: at these shapes the eager loops' backward takes seconds to minutes per call "
                               "here (see benchmarks/README.md); --ops fused_moe or --ops all runs it, --quick at "
                               "16 experts"]
    return wanted, True, []


def _call_run(run: Callable, device: str, tokens: list[int], dtype: torch.dtype | None, **extra: Any) -> list[dict]:
    """``run(device, tokens, dtype=...)``, plus each of ``extra`` (not None) that this benchmark's run() takes."""
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in dict(dtype=dtype, **extra).items() if v is not None and k in params}
    return list(run(device, tokens, **kwargs))


def _default_out(device: str, suffix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("benchmarks") / "results" / f"bench_{torch.device(device).type}_{stamp}.{suffix}"


def cmd_bench(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    dev = torch.device(device)
    info = machine_info(dev)
    if args.dtype:
        dtype, why = DTYPES[args.dtype], "--dtype"
    elif dev.type == "cpu":
        dtype, why = cpu_bench_dtype()
    else:
        dtype, why = torch.bfloat16, "bf16 on GPU"
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = (QUICK_TOKENS if args.quick else DEFAULT_TOKENS).get(dev.type, DEFAULT_TOKENS["cuda"])
    shapes = None
    if args.quick and not args.full_shapes:
        # --quick keeps the 30B-A3B layer widths but only 16 experts (top-4): a smoke run in seconds
        shapes = {"experts": 16, "top_k": 4}
    wanted, backward, notes = select_benchmarks(device, shapes is not None, args.ops)
    print(f"qwen3moe-kernels bench on {device_label(info)}")
    print(f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
          f"commit {info['git_commit']}")
    print(f"dtype {dtype_name(dtype)} ({why}); tokens {tokens}; ops {', '.join(wanted)}")
    t0 = time.perf_counter()
    results: list[dict] = []
    for op in wanted:
        mod = BENCHMARKS.get(op) or NAMED_ONLY.get(op)
        if mod is None:
            why_not = f"no benchmark {op!r}; choose from {', '.join([*BENCHMARKS, *NAMED_ONLY])} or all"
            notes.append(f"{op}: {why_not}")
            results.append({"op": op, "impl": "-", "error": why_not})
            continue
        if op == "fused_moe":
            print("fused_moe: " + ("Qwen3-30B-A3B shapes (H=2048, I=768, E=128, top-8)" if shapes is None
                                   else f"quick shapes {dict(QWEN3_30B_A3B, **shapes)}")
                  + ("" if backward else ", forward only"))
            extra = dict(shapes=shapes, backward=backward, budget_s=0.3 if args.quick else args.budget,
                         min_runs=3 if args.quick else 5)
        else:
            print(f"{op}: qwen3moe_kernels.bench.{op}")
            # --quick: its shapes and a short timing, where the benchmark's run() takes them
            extra = dict(shapes=shapes, budget_s=0.3, min_runs=3) if args.quick else {}
        try:
            got = _call_run(mod.run, device, tokens, dtype, **extra)
            add_ratios(got)
            results += got
        except Exception as exc:  # one broken benchmark must not hide the others
            notes.append(f"{op}: {type(exc).__name__}: {exc}")
            results.append({"op": op, "impl": "-", "error": f"{type(exc).__name__}: {exc}"})
    print()
    print(bench_table(results))
    print("\nx eager / x transformers: the baseline's median over this row's (>1 = faster); the transformers "
          "baseline is its fastest mode in the same run.")
    if any(r.get("frac_peak") is not None for r in results):
        print(PEAK_NOTE)
    for n in notes:
        print(f"note: {n}")
    out = Path(args.out) if args.out else _default_out(device, "json")
    config = {"command": "bench", "argv": sys.argv[1:], "dtype": dtype_name(dtype), "dtype_reason": why,
              "tokens": tokens, "ops": wanted, "fused_moe_backward": backward,
              "moe_shapes": dict(QWEN3_30B_A3B, **(shapes or {})), "seconds": round(time.perf_counter() - t0, 1)}
    save_json(out, results, info, config)
    print(f"saved {out} ({config['seconds']} s)")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        got = plot(results, png, title=f"qwen3moe-kernels bench: {device_label(info)}")
        if got:
            print(f"saved {got}")
    failed = [r for r in results if r.get("error") or r.get("check") == "FAIL"]
    if failed:
        names = sorted({f"{r.get('op')}/{r.get('impl')}" for r in failed})
        print(f"{len(failed)} row(s) failed: {', '.join(names)}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------- compile-check


def cmd_compile_check(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module("qwen3moe_kernels.tools.compile_check")
    except ModuleNotFoundError as exc:
        if exc.name not in ("qwen3moe_kernels.tools", "qwen3moe_kernels.tools.compile_check"):
            raise
        print("compile-check is not available in this install: qwen3moe_kernels.tools.compile_check is missing",
              file=sys.stderr)
        return 2
    return int(mod.main(list(args.rest)) or 0)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3moe-kernels", description="Qwen3-MoE kernels: check and benchmark.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="check every public op against the reference on this device")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--dtype", help="comma-separated: fp32,bf16,fp16 (default: fp32 plus the native low precision)")
    c.add_argument("--tokens", type=int, help="token count T of the inputs (default 64; 16 with --quick)")
    c.add_argument("--quick", action="store_true", help="16 experts instead of 128 (a smoke run in seconds)")
    c.add_argument("--ops", help="only the ops whose name contains one of these comma-separated words")
    c.add_argument("--json", help="also save the rows as JSON here")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="benchmark the Qwen3-30B-A3B MoE block (fused_moe) and every op")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU; on CPU by capability")
    b.add_argument("--tokens", help="comma-separated token counts (default: decode and prefill counts per device)")
    b.add_argument("--ops", help=f"comma-separated from {', '.join([*BENCHMARKS, *NAMED_ONLY])}; or 'all' (default: "
                                 "every benchmark but model and ep, and on a CPU at full shapes fused_moe without its "
                                 "slow forward+backward; 'all': all of those and the model benchmark; ep, expert "
                                 "parallelism over gloo processes, runs only when named)")
    b.add_argument("--out", help="JSON path (default benchmarks/results/bench_<device>_<utc time>.json)")
    b.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    b.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    b.add_argument("--quick", action="store_true",
                   help="few token counts, 16 experts (no TFLOP/s for the block: not a roofline model), short timing")
    b.add_argument("--full-shapes", action="store_true", help="with --quick, keep all 128 experts")
    b.add_argument("--budget", type=float, default=1.5,
                   help="seconds of timed calls per fused_moe measurement (default 1.5)")
    b.set_defaults(func=cmd_bench)

    # parsed by qwen3moe_kernels.tools.compile_check itself (see main); listed here for --help
    sub.add_parser("compile-check", help="AOT-compile every shipped Triton kernel config for sm_90 and sm_100")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile-check"]:
        # everything after the subcommand belongs to compile_check's own parser (its --help included)
        return cmd_compile_check(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
