"""The ``qwen3moe-kernels`` console command.

    qwen3moe-kernels check            every fused entry point and every op module that exists, against the
                                      reference, on this machine's device: max error, tolerance, pass/fail and
                                      the implementation that ran; exit status 1 if anything fails
    qwen3moe-kernels bench            the Qwen3-30B-A3B sparse MoE block (H=2048, I=768, E=128, top-8) for decode
                                      and prefill token counts, fused vs eager vs transformers' own block, plus each
                                      op benchmark found in the repository's benchmarks/ folder (on a CPU at full
                                      shapes without fused_moe's slow forward+backward; --ops all adds it and the
                                      model benchmark); prints a table and saves JSON and a PNG plot; exit status
                                      1 if any row has an error or a failed check
    qwen3moe-kernels compile-check    ahead-of-time compile of every shipped Triton kernel config for sm_90/sm_100
                                      (``qwen3moe_kernels.compile_check``)

Op benchmarks live in ``benchmarks/bench_<stem>.py`` (pytest-benchmark suites, each with a plain
``run(device, token_counts, dtype=None) -> list[dict]`` of rows with op, impl and tokens; with --quick ``bench``
also passes ``shapes``, ``budget_s`` and ``min_runs`` to a run() that takes them). ``benchmarks/`` is not part of
the installed package, so ``bench`` loads those modules from the source checkout the package was installed from
(an editable install, as the README does) or from ``./benchmarks`` in the current directory; from a plain wheel
install only the MoE block, whose benchmark is in the package (:mod:`qwen3moe_kernels.bench`), runs and the rest
is reported as not found.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from . import bench, dispatch, fused, reference
from .bench import QWEN3_30B_A3B, dtype_name
from .tolerances import TOL, twice_torch_error_bound

# ---------------------------------------------------------------------------------------------- check


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_check_dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16]
    # bf16 only where the CPU computes it natively: emulated bf16 GEMMs at 30B shapes would take minutes.
    lowp, _ = bench.cpu_bench_dtype()
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
            self._w32 = bench.make_moe_weights(self.H, self.I, self.E, torch.float32, self.device, seed=self.seed)
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
            err = bench.max_abs_err(o, r32)
            bound = twice_torch_error_bound(r32, r)
            good = err <= bound
        else:
            k = kind if r.dtype == dtype else "router"  # fp32 outputs of a low-precision op (router weights)
            err = bench.max_abs_err(o, r)
            bound = bench.close_bound(r, k, r.dtype if r.dtype in TOL[k] else dtype)
            good = bench.close_ok(o, r, k, r.dtype if r.dtype in TOL[k] else dtype)
        ok = ok and good and not (o.is_floating_point() and torch.isnan(o).any().item() and not torch.isnan(r).any().item())
        if err >= worst_err:
            worst_err, worst_bound = err, bound
    return worst_err, worst_bound, ok


class Case:
    """One op to check: ``run(inputs)`` returns (our output, reference output, fp32 reference or None)."""

    def __init__(self, op: str, kind: str, shape: Callable[[_Inputs], str], run: Callable):
        self.op, self.kind, self.shape, self.run = op, kind, shape, run


def _fused_cases() -> list[Case]:
    def moe(d, inp):
        out = fused.sparse_moe_block(d["x"], d["router_weight"], d["w_gate_up"], d["w_down"], inp.k, True)
        ref = reference.sparse_moe_block(d["x"], d["router_weight"], d["w_gate_up"], d["w_down"], inp.k, True)
        ref32 = None
        if d["x"].dtype != torch.float32:
            w = {"router_weight": d["router_weight"], "w_gate_up": d["w_gate_up"], "w_down": d["w_down"]}
            ref32 = (bench._experts_fp32_by_chunks(d["x"], d["topk_ids"], d["topk_weights"], w), ref[1].float())
        return out, ref, ref32

    def norm(d, inp):
        return (fused.rms_norm(d["x"], d["norm_weight"], inp.eps), reference.rms_norm(d["x"], d["norm_weight"], inp.eps),
                None)

    def add_norm(d, inp):
        args = (d["x"], d["residual"], d["norm_weight"], inp.eps)
        return fused.fused_add_rms_norm(*args), reference.fused_add_rms_norm(*args), None

    def qk(d, inp):
        args = (d["q"], d["k"], d["q_weight"], d["k_weight"], d["cos"], d["sin"], inp.eps)
        return fused.qk_norm_rope(*args), reference.qk_norm_rope(*args), None

    return [
        Case("fused.sparse_moe_block", "gemm", lambda i: f"x[{i.T},{i.H}] E={i.E} I={i.I} k={i.k}", moe),
        Case("fused.rms_norm", "elementwise", lambda i: f"x[{i.T},{i.H}]", norm),
        Case("fused.fused_add_rms_norm", "elementwise", lambda i: f"x,res[{i.T},{i.H}]", add_norm),
        Case("fused.qk_norm_rope", "elementwise", lambda i: f"q[1,{i.T},{i.Hq},{i.D}] k[1,{i.T},{i.Hk},{i.D}]", qk),
    ]


# Reference-spec arguments for each op stem: ops/<stem>.py exposes ``<stem>(...)`` with the signature of
# ``reference.<stem>`` (the project's convention: every kernel is tested against the reference function of the
# same name). Value: (tolerance kind, shape text, builder of the positional arguments).
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
                    lambda d, i: (d["x"], d["topk_ids"], d["topk_weights"], d["w_gate_up"], d["w_down"])),
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


def discover_op_modules() -> list[str]:
    """The op stems that exist in this install (``qwen3moe_kernels/ops/<stem>.py``)."""
    from . import ops

    return sorted(m.name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_"))


def _op_cases(notes: list[str]) -> list[Case]:
    """One case per public function of each op module whose name is a reference function with known arguments."""
    cases = []
    stems = discover_op_modules()
    if not stems:
        notes.append("no op modules in qwen3moe_kernels/ops yet: only the fused entry points were checked")
    for stem in stems:
        try:
            mod = importlib.import_module(f"qwen3moe_kernels.ops.{stem}")
        except Exception as exc:  # a broken op module is a failure of check, shown as one row
            cases.append(Case(f"ops.{stem}", "exact", lambda i: "-", _raiser(f"import failed: {exc!r}")))
            continue
        # the op's own public function (a plain function or a torch.library custom op object), not a name the
        # module merely imported from the reference or the fused entry points
        names = [n for n in _OP_ARGS if callable(getattr(mod, n, None))
                 and getattr(mod, n) is not getattr(reference, n, None) and getattr(mod, n) is not getattr(fused, n, None)]
        if not names:
            notes.append(f"ops.{stem}: no function named like a reference op ({', '.join(sorted(_OP_ARGS))}); "
                         "checked by its own tests only")
        for name in names:
            kind, shape, args = _OP_ARGS[name]
            fn, ref = getattr(mod, name), getattr(reference, name)

            def run(d, inp, fn=fn, ref=ref, args=args, kind=kind):
                a = args(d, inp)
                out, expect = fn(*a), ref(*a)
                ref32 = None
                if kind == "gemm" and d["x"].dtype != torch.float32:
                    w = {"w_gate_up": d["w_gate_up"], "w_down": d["w_down"]}
                    ref32 = bench._experts_fp32_by_chunks(d["x"], d["topk_ids"], d["topk_weights"], w)
                return out, expect, ref32

            cases.append(Case(f"ops.{stem}.{name}", kind, shape, run))
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
    cases = _fused_cases() + _op_cases(notes)
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
            dispatch.reset()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", dispatch.FallbackWarning)
                    out, ref, ref32 = case.run(d, inputs)
                err, bound, ok = _compare(out, ref, case.kind, dtype, ref32)
                row.update(max_err=err, tol=bound, result="pass" if ok else "FAIL")
                row["rule"] = "2x torch error vs fp32" if ref32 is not None else f"{case.kind} table"
            except Exception as exc:  # a crash is a failure, reported in the table rather than aborting the rest
                row.update(result="ERROR", error=f"{type(exc).__name__}: {exc}")
                row["trace"] = traceback.format_exc(limit=3)
            row["ran"] = bench.last_implementations() if "error" not in row else row["error"][:120]
            rows.append(row)
    return rows, notes


def cmd_check(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    dev = torch.device(device)
    dtypes = [bench.DTYPES[d] for d in args.dtype.split(",")] if args.dtype else _default_check_dtypes(dev)
    info = bench.machine_info(dev)
    shapes = {"experts": 16, "top_k": 4} if args.quick else None
    tokens = args.tokens if args.tokens is not None else (16 if args.quick else 64)
    print(f"qwen3moe-kernels check on {bench.device_label(info)}; torch {info['torch']}, triton {info['triton']}")
    what = ("Qwen3-30B-A3B (H=2048, I=768, E=128, top-8, head_dim 128, 32/4 heads)" if shapes is None
            else "--quick: Qwen3-30B-A3B widths with 16 experts, top-4")
    print(f"shapes: {what}, T={tokens}; dtypes: {', '.join(dtype_name(d) for d in dtypes)}")
    t0 = time.perf_counter()
    rows, notes = run_check(device, dtypes, tokens, args.ops.split(",") if args.ops else None, shapes)
    print()
    print(bench.format_table(rows, CHECK_COLUMNS))
    for note in notes:
        print(f"note: {note}")
    bad = [r for r in rows if r["result"] != "pass"]
    for r in bad:
        if r.get("trace"):
            print(f"\n{r['op']} ({r['dtype']}):\n{r['trace']}")
    print(f"\n{len(rows) - len(bad)}/{len(rows)} passed in {time.perf_counter() - t0:.1f} s")
    if args.json:
        bench.save_json(args.json, rows, info, {"command": "check", "tokens": tokens, "shapes": shapes})
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- bench


def benchmarks_dir() -> Path | None:
    """The repository's benchmarks/ folder: beside the package in a source checkout, else ./benchmarks."""
    for cand in (Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"):
        if cand.is_dir():
            return cand
    return None


def find_op_benchmarks() -> dict[str, Path]:
    """``stem -> benchmarks/bench_<stem>.py`` for every op benchmark module (the block and model are separate)."""
    root = benchmarks_dir()
    if root is None:
        return {}
    return {p.stem[len("bench_"):]: p for p in sorted(root.glob("bench_*.py"))
            if p.stem not in ("bench_moe_block", "bench_model")}


def model_benchmark_path() -> Path | None:
    root = benchmarks_dir()
    path = root / "bench_model.py" if root is not None else None
    return path if path is not None and path.exists() else None


def load_benchmark(path: Path):
    name = f"qwen3moe_kernels_benchmarks_{path.stem}"
    cached = sys.modules.get(name)
    if cached is not None and Path(cached.__file__).resolve() == Path(path).resolve():
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    # the benchmarks import each other's helpers (conftest-free) by plain name
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return mod


def _call_run(run: Callable, device: str, tokens: list[int], dtype: torch.dtype | None,
              **extra: Any) -> list[dict]:
    """``run(device, tokens, dtype=...)``, plus each of ``extra`` (not None) that the benchmark's run() takes."""
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in dict(dtype=dtype, **extra).items() if v is not None and k in params}
    return list(run(device, tokens, **kwargs))


def _normalise(row: dict, stem: str, device: str) -> dict:
    """Map an op benchmark's row onto the table's keys (benchmarks written by others may name them differently)."""
    r = dict(row)
    r.setdefault("op", r.pop("name", stem))
    for alt in ("T", "num_tokens", "n_tokens"):
        if "tokens" not in r and alt in r:
            r["tokens"] = r[alt]
    for alt in ("implementation", "provider", "backend"):
        if "impl" not in r and alt in r:
            r["impl"] = r[alt]
    if isinstance(r.get("dtype"), torch.dtype):
        r["dtype"] = dtype_name(r["dtype"])
    r.setdefault("device", device)
    return r


def _default_out(device: str, suffix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("benchmarks") / "results" / f"bench_{torch.device(device).type}_{stamp}.{suffix}"


def cmd_bench(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    dev = torch.device(device)
    info = bench.machine_info(dev)
    if args.dtype:
        dtype, why = bench.DTYPES[args.dtype], "--dtype"
    elif dev.type == "cpu":
        dtype, why = bench.cpu_bench_dtype()
    else:
        dtype, why = torch.bfloat16, "bf16 on GPU"
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = (bench.QUICK_TOKENS if args.quick else bench.DEFAULT_TOKENS).get(dev.type, bench.DEFAULT_TOKENS["cuda"])
    shapes = None
    if args.quick and not args.full_shapes:
        # --quick keeps the 30B-A3B layer widths but only 16 experts (top-4): a smoke run in seconds
        shapes = {"experts": 16, "top_k": 4}
    op_paths = find_op_benchmarks()
    wanted = ["moe_block", *op_paths]  # the default: the block and every op benchmark found
    notes: list[str] = []
    if not args.ops and dev.type == "cpu" and shapes is None and "fused_moe" in wanted:
        wanted.remove("fused_moe")
        notes.append("fused_moe (the block's forward + backward) is left out of the default CPU run: at these "
                     "shapes the eager loops' backward takes seconds to minutes per call here (see "
                     "benchmarks/bench_fused_moe.py); --ops fused_moe or --ops all runs it, --quick at 16 experts")
    if args.ops:
        asked = [o.strip() for o in args.ops.split(",") if o.strip()]
        if asked != ["all"]:
            wanted = asked
        elif model_benchmark_path() is not None:
            wanted.append("model")
        else:  # a wheel install: everything there is, and say what is not
            notes.append("model: no benchmarks/bench_model.py found (benchmarks/ is read from the source checkout)")
    print(f"qwen3moe-kernels bench on {bench.device_label(info)}")
    print(f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
          f"commit {info['git_commit']}")
    print(f"dtype {dtype_name(dtype)} ({why}); tokens {tokens}; ops {', '.join(wanted)}")
    t0 = time.perf_counter()
    results: list[dict] = []
    for op in wanted:
        if op == "moe_block":
            print("moe_block: " + ("Qwen3-30B-A3B shapes (H=2048, I=768, E=128, top-8)" if shapes is None
                                   else f"quick shapes {dict(QWEN3_30B_A3B, **shapes)}"))
            results += bench.bench_moe_block(dev, tokens, dtype, shapes=shapes,
                                             budget_s=0.3 if args.quick else args.budget,
                                             min_runs=3 if args.quick else 5)
            continue
        path = model_benchmark_path() if op == "model" else op_paths.get(op)
        if path is None:
            why = f"no benchmarks/bench_{op}.py found (benchmarks/ is read from the source checkout)"
            notes.append(f"{op}: {why}")
            results.append({"op": op, "impl": "-", "error": why})
            continue
        try:
            mod = load_benchmark(path)
            run = getattr(mod, "run")
            print(f"{op}: {path}")
            # --quick: its shapes and a short timing, where the benchmark's run() takes them
            quick = dict(shapes=shapes, budget_s=0.3, min_runs=3) if args.quick else {}
            got = [_normalise(r, op, device) for r in _call_run(run, device, tokens, dtype, **quick)]
            bench.add_ratios(got)
            results += got
        except Exception as exc:  # one broken benchmark must not hide the others
            notes.append(f"{op}: {type(exc).__name__}: {exc}")
            results.append({"op": op, "impl": "-", "error": f"{type(exc).__name__}: {exc}"})
    print()
    print(bench.bench_table(results))
    print("\nx eager / x transformers: the baseline's median over this row's (>1 = faster); the transformers "
          "baseline is its fastest mode in the same run.")
    if any(r.get("frac_peak") is not None for r in results):
        print(bench.PEAK_NOTE)
    for n in notes:
        print(f"note: {n}")
    out = Path(args.out) if args.out else _default_out(device, "json")
    config = {"command": "bench", "argv": sys.argv[1:], "dtype": dtype_name(dtype), "dtype_reason": why,
              "tokens": tokens, "ops": wanted, "moe_shapes": dict(QWEN3_30B_A3B, **(shapes or {})),
              "seconds": round(time.perf_counter() - t0, 1)}
    bench.save_json(out, results, info, config)
    print(f"saved {out} ({config['seconds']} s)")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        got = bench.plot(results, png, title=f"qwen3moe-kernels bench: {bench.device_label(info)}")
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
        mod = importlib.import_module("qwen3moe_kernels.compile_check")
    except ModuleNotFoundError as exc:
        if exc.name != "qwen3moe_kernels.compile_check":
            raise
        print("compile-check is not available in this install: qwen3moe_kernels.compile_check is missing",
              file=sys.stderr)
        return 2
    return int(mod.main(list(args.rest)) or 0)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3moe-kernels", description="Qwen3-MoE kernels: check and benchmark.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="check every fused op and op module against the reference on this device")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--dtype", help="comma-separated: fp32,bf16,fp16 (default: fp32 plus the native low precision)")
    c.add_argument("--tokens", type=int, help="token count T of the inputs (default 64; 16 with --quick)")
    c.add_argument("--quick", action="store_true", help="16 experts instead of 128 (a smoke run in seconds)")
    c.add_argument("--ops", help="only the ops whose name contains one of these comma-separated words")
    c.add_argument("--json", help="also save the rows as JSON here")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="benchmark the Qwen3-30B-A3B MoE block and every op benchmark found")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", choices=sorted(bench.DTYPES), help="default: bf16 on GPU; on CPU by capability")
    b.add_argument("--tokens", help="comma-separated token counts (default: decode and prefill counts per device)")
    b.add_argument("--ops", help="comma-separated: moe_block, op stems (benchmarks/bench_<stem>.py), model; or 'all' "
                                 "(default: moe_block and every op benchmark, but on a CPU at full shapes not "
                                 "fused_moe's slow forward+backward; 'all': all of those and the model benchmark)")
    b.add_argument("--out", help="JSON path (default benchmarks/results/bench_<device>_<utc time>.json)")
    b.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    b.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    b.add_argument("--quick", action="store_true",
                   help="few token counts, 16 experts (no TFLOP/s for the block: not a roofline model), short timing")
    b.add_argument("--full-shapes", action="store_true", help="with --quick, keep all 128 experts")
    b.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per measurement (default 1.5)")
    b.set_defaults(func=cmd_bench)

    # parsed by qwen3moe_kernels.compile_check itself (see main); listed here for --help
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
