"""Tune the launch configs of the grouped-GEMM SwiGLU kernels on a GPU and write that device's table.

    python -m qwen3moe_kernels.tools.tune_grouped_swiglu [--models 30B-A3B,235B-A22B]
        [--tokens 1,8,64,512,2048,8192,16384] [--dtypes bf16] [--kernels gate_up,down,down_bwd,dx,wgrad] [--reps 50]
        [--warmup 10] [--input-sets 3] [--out-dir qwen3moe_kernels/kernels/configs]
    TRITON_INTERPRET=1 python -m qwen3moe_kernels.tools.tune_grouped_swiglu --interpret --tiny --out-dir /tmp/tables

Per model shape, token count, dtype and kernel: each candidate config is checked against the CPU implementation
(``ops.grouped_swiglu_cpu``), timed, and the fastest that passes compile-check for sm_90 and sm_100 goes into
``grouped_swiglu_<device>.json`` (``kernels.grouped_swiglu.table_path``). ``--interpret --tiny`` runs the
mechanics on CPU (what tests/test_grouped_swiglu.py does; such a table never goes into the package). The method:
docs/gpu_verification.md ("Tuning the grouped-GEMM SwiGLU configs"); the table format: kernels/configs/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

MODELS = {"30B-A3B": (2048, 768, 128, 8), "235B-A22B": (4096, 1536, 128, 8)}  # H, I, E, top_k
TINY = {"tiny": (64, 32, 4, 2)}
DTYPES = ("bf16", "fp16", "fp32")
FLUSH_BYTES = 256 << 20

# (BLOCK_M, BLOCK_N, BLOCK_K at 16 bits, GROUP_M, num_warps, num_stages)
_DECODE = [(16, 32, 128, 1, 4, 3), (16, 64, 128, 1, 4, 3), (16, 32, 64, 1, 4, 4), (16, 64, 64, 1, 4, 4),
           (16, 128, 64, 1, 4, 3), (32, 64, 64, 1, 4, 3)]
_LARGE = [(64, 64, 64, 8, 4, 3), (64, 128, 64, 8, 4, 3), (64, 64, 128, 8, 4, 3), (128, 64, 64, 8, 4, 3),
          (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4), (128, 256, 64, 8, 8, 3)]
_WGRAD = [(64, 64, 16, 8, 4, 3), (64, 64, 32, 8, 4, 3), (128, 64, 32, 8, 4, 3), (64, 128, 32, 8, 4, 3),
          (128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4)]
_TINY_ALT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _cfg(t):
    return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"), t))


def candidates(kern, kernel: str, dtype: str, slots: int, tiny: bool = False) -> list[dict]:
    """The heuristic's config first, then the fixed list for this phase (BLOCK_K halved for fp32), deduplicated.
    ``tiny``: the heuristic's and one small-tile alternative."""
    heuristic = kern._launch_opts(kern.default_config(slots, kernel, dtype))
    if tiny:
        rest = [_TINY_ALT]
    else:
        table = _WGRAD if kernel == "wgrad" else (_DECODE if slots <= 64 else _LARGE)
        rest = [_cfg(t) for t in table]
        if dtype == "fp32":
            rest = [{**c, "BLOCK_K": max(16, c["BLOCK_K"] // 2)} for c in rest]
    out = [heuristic]
    for c in rest:
        if c not in out:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- checking


def close(name: str, got, want, dtype) -> str | None:
    """None when ``got`` matches the CPU implementation's ``want`` within the gemm tolerance of ``dtype`` (atol
    scaled by the largest reference value), else what is wrong."""
    import torch

    from qwen3moe_kernels.tolerances import tol

    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    t = tol("gemm", dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs()
    bad = err > t["atol"] * scale + t["rtol"] * want.abs()
    if bad.any():
        return f"{name}: {int(bad.sum())} elements off, max error {err.max().item():.3e} (scale {scale:.3e})"
    return None


# ---------------------------------------------------------------------------------------------- problems


class Problem:
    """One (shape, T, dtype, input set): the inputs, the kernels' slot orders, and the CPU implementation's results."""

    def __init__(self, H, I, E, k, T, dtype, device, weights, seed):
        import torch

        from qwen3moe_kernels import reference
        from qwen3moe_kernels.ops import grouped_swiglu_cpu as cpu
        from qwen3moe_kernels.ops import moe_sort

        self.H, self.I, self.E, self.k, self.T = H, I, E, k, T
        g = torch.Generator(device=device).manual_seed(seed)
        self.wgu, self.wd = weights
        self.x = torch.randn(T, H, generator=g, device=device).to(dtype)
        self.dout = torch.randn(T, H, generator=g, device=device).to(dtype)
        logits = torch.randn(T, E, generator=g, device=device)
        w, ids = reference.router_topk(logits, k, True)
        self.ids, self.w = ids.to(torch.int32).contiguous(), w.float().contiguous()
        # the CPU implementation's results (plain torch, any device): the references, and the inputs of the later
        # kernels
        self.h, self.gu = cpu.gate_up(self.x, self.wgu, self.ids, True)
        self.out = cpu.down(self.h, self.wd, self.ids, self.w)
        self.dgu, self.dwd, self.drw = cpu.down_backward(self.dout, self.h, self.gu, self.wd, self.ids, self.w, True)
        self.dx, self.dwgu = cpu.gate_up_backward(self.dgu, self.x, self.wgu, self.ids, True)
        self.sorted_slots, _, self.offsets = moe_sort(self.ids, E)
        self._aligned = {}

    def aligned(self, block_m: int):
        from qwen3moe_kernels.ops import moe_align_block

        if block_m not in self._aligned:
            padded, be, _ = moe_align_block(self.ids, self.E, block_m)
            self._aligned[block_m] = (padded, be)
        return self._aligned[block_m]

    def launcher(self, kern, kernel: str, cfg: dict):
        """(run, check): ``run()`` launches the kernel(s) as the op does; ``check()`` runs it once and returns
        None or what differs from the CPU implementation."""
        dt = self.x.dtype
        padded, be = self.aligned(cfg["BLOCK_M"])
        if kernel == "gate_up":
            def run():
                return kern.gate_up(self.x, self.wgu, padded, be, self.k, cfg, store_gu=False)

            def check():
                h, _ = run()
                h2, gu = kern.gate_up(self.x, self.wgu, padded, be, self.k, cfg, store_gu=True)
                return (close("h", h, self.h, dt) or close("h (STORE_GU)", h2, self.h, dt)
                        or close("gu", gu, self.gu, dt))
        elif kernel == "down":
            def run():
                return kern.down(self.h, self.wd, self.w, padded, be, cfg)

            def check():
                return close("out", kern.sum_slots(run(), self.k), self.out, dt)
        elif kernel == "down_bwd":
            def run():
                return kern.down_bwd(self.dout, self.wd, self.h, self.gu, self.w, padded, be, self.k, cfg)

            def check():
                dgu, drw = run()
                return close("dgu", dgu, self.dgu, dt) or close("drw", drw, self.drw, dt)
        elif kernel == "dx":
            def run():
                return kern.dx(self.dgu, self.wgu, padded, be, cfg)

            def check():
                return close("dx", kern.sum_slots(run(), self.k), self.dx, dt)
        elif kernel == "wgrad":  # both launches of the backward: dW_down and dW_gate_up
            def run():
                a = kern.wgrad(self.dout, self.h, self.w, self.sorted_slots, self.offsets, self.E, self.k, 1, cfg)
                b = kern.wgrad(self.dgu, self.x, None, self.sorted_slots, self.offsets, self.E, 1, self.k, cfg)
                return a, b

            def check():
                a, b = run()
                return close("dw_down", a, self.dwd, dt) or close("dw_gate_up", b, self.dwgu, dt)
        else:
            raise ValueError(kernel)
        return run, check


# ----------------------------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of ``reps`` calls after ``warmup``: CUDA events around each call after an L2 flush, or
    the wall clock under the interpreter."""

    def __init__(self, device, reps: int, warmup: int):
        import torch

        self.cuda = device.type == "cuda"
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def times(self, fn) -> list[float]:
        import torch

        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            ts = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return ts
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]


# ------------------------------------------------------------------------------------------- the sweep


def compile_ok(kern, kernel, dtype, H, I, E, k, slots, cfg, cache: dict) -> str | None:
    """None when every compile of ``cfg`` passes compile-check's rules on sm_90 and sm_100, else the problems."""
    from qwen3moe_kernels.tools import compile_check as cc

    specs = kern.kernel_specs(kernel, dtype, H, I, E, slots, cfg, "tune", k)
    key = tuple(s.jit_variant() for s in specs)
    if key not in cache:
        # one process: compile_all's worker pool forks, and this process has initialised CUDA
        rows = cc.compile_all(specs, cc.ARCHS, jobs=1)
        problems = [f"{r.arch}: {p}" for r in rows for p in r.problems]
        cache[key] = "; ".join(problems) or None
    return cache[key]


def tune_one(kern, problems, kernel, dtype, slots, timer, tiny, interpret, cc_cache, log) -> dict:
    H, I, E, k, T = problems[0].H, problems[0].I, problems[0].E, problems[0].k, problems[0].T
    rows = []
    for cfg in candidates(kern, kernel, dtype, slots, tiny):
        row = {"config": cfg, "ms": None, "error": None}
        try:
            ts = []
            for p in problems:
                run, check = p.launcher(kern, kernel, cfg)
                err = check()
                if err:
                    row["error"] = f"check failed: {err}"
                    break
                ts += timer.times(run)
            else:
                row["ms"] = round(statistics.median(ts), 5)
        except Exception as exc:  # a config that does not launch (e.g. out of shared memory) is a result too
            last = str(exc).strip().splitlines()[-1:] or [""]
            row["error"] = f"{type(exc).__name__}: {last[0][:300]}"
        rows.append(row)
        log(f"  {kernel:8s} {dtype} H={H} I={I} E={E} T={T:6d} {_fmt(cfg)}: "
            + (f"{row['ms']:.4f} ms" if row["ms"] is not None else row["error"]))
    ranked = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
    winner = None
    for r in ranked:
        if interpret:
            r["compile_check"] = "skipped (interpreter)"
        else:
            problem = compile_ok(kern, kernel, dtype, H, I, E, k, slots, r["config"], cc_cache)
            r["compile_check"] = problem or "ok"
            if problem:
                log(f"    {_fmt(r['config'])} fails compile-check: {problem}")
                continue
        winner = r
        break
    if winner is None:
        raise RuntimeError(f"{kernel} {dtype} H={H} I={I} E={E} T={T}: no candidate passed (see the log)")
    return {"kernel": kernel, "dtype": dtype, "H": H, "I": I, "E": E, "top_k": k, "tokens": T, "slots": slots,
            "config": winner["config"], "ms": winner["ms"], "heuristic_ms": rows[0]["ms"],
            "heuristic_config": rows[0]["config"], "candidates": rows}


def _fmt(cfg: dict) -> str:
    return "BM={BLOCK_M} BN={BLOCK_N} BK={BLOCK_K} G={GROUP_M} w={num_warps} s={num_stages}".format(**cfg)


def versions(device) -> dict:
    import torch
    import triton

    v = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
         "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        v.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return v


def merge(path: Path, new_entries: list[dict], header: dict) -> dict:
    """The table at ``path`` (if any) with ``new_entries`` replacing those of the same kernel, dtype, shape and
    slot count."""
    key = lambda e: (e["kernel"], e["dtype"], e["H"], e["I"], e["E"], e["slots"])  # noqa: E731
    old = json.loads(path.read_text()).get("entries", []) if path.exists() else []
    fresh = {key(e) for e in new_entries}
    entries = sorted([e for e in old if key(e) not in fresh] + new_entries, key=key)
    return {**header, "entries": entries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3moe_kernels.tools.tune_grouped_swiglu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="1,8,64,512,2048,8192,16384", help="token counts T (slots = T * top_k)")
    p.add_argument("--dtypes", default="bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--kernels", default="gate_up,down,down_bwd,dx,wgrad")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--input-sets", type=int, default=3, help="routings (random ids, weights, activations) per point")
    p.add_argument("--out-dir", default=None, help="where the table goes (default: the package's kernels/configs)")
    p.add_argument("--interpret", action="store_true", help="CPU tensors under TRITON_INTERPRET=1 (mechanics only)")
    p.add_argument("--tiny", action="store_true", help="one tiny shape, T=8, fp32, two candidates, one short timing")
    args = p.parse_args(argv)

    if args.interpret != (os.environ.get("TRITON_INTERPRET") == "1"):
        p.error("--interpret goes with TRITON_INTERPRET=1 in the environment, and only with it (interpreted "
                "kernels on a GPU would time the interpreter)")
    import torch

    from qwen3moe_kernels.kernels import grouped_swiglu as kern

    if args.interpret:
        device, name = torch.device("cpu"), "interpreter"
        if args.out_dir is None or Path(args.out_dir).resolve() == kern.CONFIG_DIR:
            p.error("--interpret tables are not measurements: give an --out-dir outside the package")
    else:
        if not torch.cuda.is_available():
            print("tune_grouped_swiglu: no CUDA device (use --interpret --tiny for a CPU run of the mechanics)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    if args.tiny:
        models, tokens, dtypes = TINY, [8], ["fp32"]
        args.reps, args.warmup, args.input_sets = min(args.reps, 2), 0, 1
    else:
        models = {m: MODELS[m] for m in args.models.split(",")}
        tokens = [int(t) for t in args.tokens.split(",")]
        dtypes = args.dtypes.split(",")
    kernels = args.kernels.split(",")
    for kernel in kernels:
        if kernel not in kern.KERNELS:
            p.error(f"unknown kernel {kernel!r} (of {', '.join(kern.KERNELS)})")
    out_dir = Path(args.out_dir) if args.out_dir else kern.CONFIG_DIR
    path = kern.table_path(name, out_dir)
    timer = Timer(device, args.reps, args.warmup)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    entries, cc_cache, t0 = [], {}, time.perf_counter()
    for model, (H, I, E, k) in models.items():
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            weights = ((torch.randn(E, 2 * I, H, generator=g, device=device) / H**0.5).to(torch_dtype[dtype]),
                       (torch.randn(E, H, I, generator=g, device=device) / I**0.5).to(torch_dtype[dtype]))
            for T in tokens:
                problems = [Problem(H, I, E, k, T, torch_dtype[dtype], device, weights, seed=1000 * T + s)
                            for s in range(args.input_sets)]
                log(f"{model} {dtype} T={T} ({T * k} slots)")
                for kernel in kernels:
                    entries.append(tune_one(kern, problems, kernel, dtype, T * k, timer, args.tiny, args.interpret,
                                            cc_cache, log))
                del problems
            del weights
    header = {
        "what": "tuned launch configs of the grouped-GEMM SwiGLU kernels (qwen3moe_kernels.tools.tune_grouped_swiglu)",
        "device": name,
        "versions": versions(device),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": (f"{'wall clock (interpreter)' if args.interpret else 'CUDA events after an L2 flush'}, median of "
                   f"{args.reps} runs after {args.warmup} warm-ups on each of {args.input_sets} input sets; every "
                   f"candidate checked against the CPU implementation first; winners compile-checked for sm_90 and "
                   f"sm_100{' (skipped under the interpreter)' if args.interpret else ''}"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merge(path, entries, header), indent=1) + "\n")
    log(f"wrote {path} ({len(entries)} entries, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
