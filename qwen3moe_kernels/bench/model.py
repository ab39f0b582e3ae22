"""Model-level prefill and decode tokens/s on a scaled-down Qwen3-30B-A3B: its real layer shapes, ``layers`` of its
48 decoder layers, the vocabulary cut by the same factor. Six variants on the same weights (:data:`VARIANTS`):
transformers with each experts mode, transformers patched by ``integrations.transformers.apply``, and the thin
``qwen3moe_kernels.Qwen3MoeForCausalLM`` on the fused and the reference backends. Each is checked against
unpatched transformers' logits before timing. ``benchmarks/README.md`` says how prefill and decode are timed.

    python -m qwen3moe_kernels.bench.model [--layers 2] [--tokens 64,512] [--decode-tokens 16] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch

from .. import recorder
from .checks import max_abs_err
from .machine import DTYPES, default_dtype, dtype_name, machine_info
from .report import format_table, last_implementations, save_json
from .timing import summarize

FULL_VOCAB, FULL_LAYERS = 151936, 48
VARIANTS = ["transformers", "transformers-grouped_mm", "transformers-qwen3moe_kernels", "transformers+qwen3moe_kernels",
            "qwen3moe_kernels-fused", "qwen3moe_kernels-eager"]


def scaled_config(layers: int = 2, vocab: int | None = None, **kw):
    from transformers import Qwen3MoeConfig

    if vocab is None:
        vocab = int(math.ceil(FULL_VOCAB * layers / FULL_LAYERS / 64) * 64)
    base = dict(
        vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
        attn_implementation="sdpa", experts_implementation="eager", decoder_sparse_step=1, mlp_only_layers=[],
    )
    base.update(kw)
    return Qwen3MoeConfig(**base)


def build_transformers_model(layers: int, dtype: torch.dtype, device: str, vocab: int | None = None, **overrides):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(scaled_config(layers, vocab, **overrides), dtype=dtype)
    return model.to(device).eval()


def set_variant(model, variant: str) -> None:
    """Switch the transformers model ``model`` to one of the ``transformers*`` :data:`VARIANTS` (in place)."""
    from ..integrations import transformers as qk_hf

    qk_hf.revert(model)
    experts = {"transformers-grouped_mm": "grouped_mm", "transformers-qwen3moe_kernels": None}.get(variant, "eager")
    model.set_experts_implementation(experts or qk_hf.register())
    if variant == "transformers+qwen3moe_kernels":
        qk_hf.apply(model)


class _LastPositionHead(torch.nn.Module):
    """The thin model's lm_head applied to the last position only: what transformers' ``logits_to_keep=1`` does.

    Generation reads only the last position's logits, so this changes no result; without it the thin model's
    prefill would compute [S, V] logits where transformers computes [1, V] (about a tenth of a 2-layer prefill).
    """

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.nn.Parameter:  # the model reads lm_head.weight (its device)
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h[:, -1:])


def thin_model(hf_model, dtype: torch.dtype, device: str):
    """The thin ``qwen3moe_kernels.Qwen3MoeForCausalLM`` on the same weights as ``hf_model``.

    Saved with transformers' ``save_pretrained`` and read back with our ``from_pretrained`` (the checkpoint path a
    user takes), backend "fused"; ``set_backend("eager")`` switches the same weights to the reference.
    Returns ``(model, None)``, or ``(None, reason)`` where the thin model cannot be built here.
    """
    import tempfile

    try:
        from .. import Qwen3MoeForCausalLM

        with tempfile.TemporaryDirectory(prefix="qwen3moe_bench_model_") as tmp:
            hf_model.save_pretrained(tmp)
            model = Qwen3MoeForCausalLM.from_pretrained(tmp, dtype=dtype, device=device, backend="fused")
    except Exception as exc:  # a broken loader must not hide the transformers rows: the table says why
        return None, f"{type(exc).__name__}: {exc}"
    model.lm_head = _LastPositionHead(model.lm_head)
    return model.eval(), None


def run(device, token_counts, dtype=None, layers: int = 2, decode_tokens: int = 16, runs: int = 5,
        variants=None, log=print, config_overrides: dict | None = None) -> list[dict]:
    """One dict per (phase, implementation, token count): median ms, spread and tokens/s.

    Every variant is checked first; then ``runs`` timing rounds, each timing every variant once in turn (prefill at
    each length, generate N, generate 1), so a load change on a shared machine hits all variants alike rather than
    whichever ran during it. ``config_overrides`` changes the Qwen3MoeConfig (the tests run this on a tiny model).
    """
    device = str(device)
    dev = torch.device(device)
    if dtype is None:
        dtype = default_dtype(dev)
    prefill_lengths = sorted({int(t) for t in token_counts if int(t) > 1}) or [64]
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown model benchmark variants {unknown}; choose from {VARIANTS}")
    t0 = time.perf_counter()
    model = build_transformers_model(layers, dtype, device, **(config_overrides or {}))
    cfg = model.config
    if log:
        log(f"model: {'scaled-down Qwen3-30B-A3B' if not config_overrides else 'overridden shapes'}, {layers} layers, "
            f"vocab {cfg.vocab_size}, {dtype_name(dtype)}; built in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    prompts = {S: torch.randint(0, cfg.vocab_size, (1, S), generator=g).to(device) for S in prefill_lengths}
    decode_prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=g).to(device)
    shape = f"{layers}L H={cfg.hidden_size} E={cfg.num_experts} k={cfg.num_experts_per_tok} V={cfg.vocab_size}"
    dt = dtype_name(dtype)

    # the unpatched model's outputs, to check every other variant against before timing it
    set_variant(model, "transformers")
    with torch.inference_mode():
        ref_logits = {S: model(input_ids=p, logits_to_keep=1).logits.float() for S, p in prompts.items()}
        ref_tokens = model.generate(decode_prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                    do_sample=False, pad_token_id=0)

    # variant -> (setup, forward(prompt) -> last-position logits, generate(prompt, n) -> tokens)
    impls: dict = {}
    for variant in variants:
        if variant.startswith("transformers"):
            impls[variant] = (
                lambda v=variant: set_variant(model, v),
                lambda p: model(input_ids=p, logits_to_keep=1).logits,
                lambda p, n: model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
            )
    thin, why = None, None
    if any(v.startswith("qwen3moe_kernels-") for v in variants):
        t1 = time.perf_counter()
        thin, why = thin_model(model, dtype, device)
        if log:
            log("thin model: " + (f"saved and loaded in {time.perf_counter() - t1:.1f} s" if thin is not None
                                  else f"not built: {why}"))
        for variant in variants:
            if variant.startswith("qwen3moe_kernels-") and thin is not None:
                impls[variant] = (
                    lambda v=variant: (set_variant(model, "transformers"), thin.set_backend(v.split("-", 1)[1])),
                    lambda p: thin(p).logits,
                    lambda p, n: thin.generate(p, max_new_tokens=n),
                )

    rows: dict = {}  # (variant, op, tokens) -> row
    for variant in variants:
        for S in prefill_lengths:
            rows[(variant, "prefill", S)] = {"op": "model-prefill", "impl": variant, "tokens": S, "dtype": dt,
                                             "shape": shape, "device": device}
        rows[(variant, "decode", decode_tokens)] = {"op": "model-decode", "impl": variant, "tokens": decode_tokens,
                                                    "dtype": dt, "shape": shape, "device": device}
        if variant not in impls:
            for r in rows.values():
                if r["impl"] == variant:
                    r["error"] = f"thin model not built: {why}"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def clock(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1e3

    times: dict = {key: [] for key in rows}
    times.update({(v, "decode-1", 1): [] for v in variants})
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", recorder.FallbackWarning)
        # 1. check every variant (and warm it up: its first calls are not timed)
        for variant, (setup, forward, generate) in impls.items():
            setup()
            recorder.reset()
            for S, p in prompts.items():
                row = rows[(variant, "prefill", S)]
                try:
                    logits = forward(p).float()
                    err = max_abs_err(logits, ref_logits[S])
                    # bf16 logits after `layers` layers: compared at the scale of the logits, as a relative error
                    rel = err / max(ref_logits[S].abs().max().item(), 1e-6)
                    row.update(max_err=err, rel_err=rel, check="pass" if rel < 0.05 else "FAIL",
                               ran=last_implementations())
                    if row["check"] != "pass":
                        row["error"] = f"prefill logits differ from transformers' by {rel:.1%} of their scale; not timed"
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
            row = rows[(variant, "decode", decode_tokens)]
            try:
                toks = generate(decode_prompt, decode_tokens)
                row["same_greedy_tokens"] = bool(torch.equal(toks.cpu(), ref_tokens.cpu()))
                # how many new tokens agree before the first flip (a near-tie in bf16 changes all that follow)
                new, ref_new = toks.cpu()[0, -decode_tokens:], ref_tokens.cpu()[0, -decode_tokens:]
                diff = (new != ref_new).nonzero()
                row["same_greedy_prefix"] = int(diff[0, 0]) if diff.numel() else decode_tokens
                generate(decode_prompt, 1)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["ran"] = last_implementations()
        # 2. timing rounds, all variants in turn
        for _ in range(runs):
            for variant, (setup, forward, generate) in impls.items():
                setup()
                for S, p in prompts.items():
                    if "error" not in rows[(variant, "prefill", S)]:
                        times[(variant, "prefill", S)].append(clock(lambda: forward(p)))
                if "error" not in rows[(variant, "decode", decode_tokens)]:
                    times[(variant, "decode", decode_tokens)].append(
                        clock(lambda: generate(decode_prompt, decode_tokens)))
                    times[(variant, "decode-1", 1)].append(clock(lambda: generate(decode_prompt, 1)))
    set_variant(model, "transformers")

    for (variant, phase, n), row in rows.items():
        ts = times[(variant, phase, n)]
        if not ts:
            continue
        if phase == "prefill":
            row.update(summarize(ts))
            row["tokens_per_s"] = n / (row["median_ms"] / 1e3)
        else:
            full, one = summarize(ts), summarize(times[(variant, "decode-1", 1)])
            ms = full["median_ms"] - one["median_ms"]
            row.update(generate_ms=full["median_ms"], generate_1_ms=one["median_ms"], runs=len(ts))
            if ms <= 0:  # noise larger than the decode time itself: no number rather than an absurd one
                row["error"] = (f"decode not measurable: generate({n}) {full['median_ms']:.1f} ms <= generate(1) "
                                f"{one['median_ms']:.1f} ms; more --runs or --decode-tokens")
                continue
            row.update(median_ms=ms, p10_ms=max(full["p10_ms"] - one["p90_ms"], 0.0),
                       p90_ms=full["p90_ms"] - one["p10_ms"])
            row["tokens_per_s"] = (n - 1) / (ms / 1e3)
    results = list(rows.values())
    if log:
        for r in results:
            log(f"  {r['op']:<13} {r['tokens']:<5} {r['impl']:<30} "
                + (f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else r.get("error", "")))
    for r in results:
        r.setdefault("vs_eager", None)
    _ratios(results)
    return results


def _ratios(results: list[dict]) -> None:
    """Speed-ups per (phase, length), baseline time / this time (>1 = faster), with the block benchmark's meanings:

    ``vs_eager``: the thin model on the reference backend (``qwen3moe_kernels-eager``, the spec);
    ``vs_transformers``: transformers' fastest experts mode in the run (``transformers_baseline`` names it);
    ``vs_transformers_eager``: unpatched transformers with eager experts.
    """
    groups: dict = {}
    for r in results:
        if r.get("median_ms"):
            groups.setdefault((r["op"], r["tokens"]), []).append(r)
    for rows in groups.values():
        hf_eager = next((r for r in rows if r["impl"] == "transformers"), None)
        hf = [r for r in rows if r["impl"].startswith("transformers") and "qwen3moe" not in r["impl"]]
        best = min(hf, key=lambda r: r["median_ms"]) if hf else None
        thin_eager = next((r for r in rows if r["impl"] == "qwen3moe_kernels-eager"), None)
        for r in rows:
            if thin_eager:
                r["vs_eager"] = thin_eager["median_ms"] / r["median_ms"]
            if hf_eager:
                r["vs_transformers_eager"] = hf_eager["median_ms"] / r["median_ms"]
            if best:
                r["vs_transformers"] = best["median_ms"] / r["median_ms"]
                r["transformers_baseline"] = best["impl"]


MODEL_COLUMNS = [
    ("op", "phase", ""), ("impl", "impl", ""), ("tokens", "tokens", ""), ("median_ms", "median ms", ".1f"),
    ("spread", "p10-p90 ms", ""), ("tokens_per_s", "tokens/s", ".1f"), ("vs_eager", "x eager", ".2f"),
    ("vs_transformers_eager", "x transformers eager", ".2f"), ("vs_transformers", "x transformers best", ".2f"),
    ("same_greedy_tokens", "same tokens", ""), ("same_greedy_prefix", "tokens agreeing", ""),
]


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        row = dict(r)
        if r.get("p10_ms") is not None:
            row["spread"] = f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}"
        if r.get("error"):
            row["impl"] = f"{r['impl']} ERROR: {r['error']}"
        rows.append(row)
    return format_table(rows, MODEL_COLUMNS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen3moe_kernels.bench.model",
                                 description="Prefill and decode tokens/s of a scaled-down Qwen3-30B-A3B, per variant.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default=None, help="prefill lengths (default 64,512 on CPU; 512,4096 on GPU)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--out", help="JSON path")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        [64, 512] if args.device == "cpu" else [512, 4096])
    dtype = DTYPES[args.dtype] if args.dtype else None
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    results = run(args.device, tokens, dtype, layers=args.layers, decode_tokens=args.decode_tokens, runs=args.runs,
                  variants=variants)
    print()
    print(table(results))
    if args.out:
        save_json(args.out, results, machine_info(args.device),
                  {"command": "bench_model", "argv": list(argv) if argv is not None else sys.argv[1:],
                   "layers": args.layers, "tokens": tokens, "decode_tokens": args.decode_tokens})
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
