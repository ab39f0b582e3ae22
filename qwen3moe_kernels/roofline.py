"""Roofline floors: the FLOPs and fewest bytes each op must spend at the Qwen3-MoE shapes, and the least time that
takes on a device. LIMITS, never results: a benchmark's time divided into its floor (:func:`row_floor`) is the
fraction of the limit reached.

``op_cost(op, model, T, dtype, backward)`` counts each input read once and each output written once, expert weights
only for the experts hit in expectation under uniform routing (``E * (1 - (1 - k/E)^T)``). ``PEAKS`` holds each
device's ``nominal`` (datasheet) and ``measured`` (bf16 8192^3 matmul, device-to-device copy) rates, labelled as such
wherever printed; :func:`measure_peaks` measures the current GPU. Table: ``python -m qwen3moe_kernels.roofline
[--device H100] [--dtype bf16]``; the method: ``docs/roofline.md``.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

MODELS = {
    "Qwen3-30B-A3B": dict(hidden=2048, inter=768, experts=128, top_k=8, head_dim=128, q_heads=32, kv_heads=4),
    "Qwen3-235B-A22B": dict(hidden=4096, inter=1536, experts=128, top_k=8, head_dim=128, q_heads=64, kv_heads=4),
}
# Token counts T: the union of the CUDA bench's (1, 8, 64, 512, 2048, 8192; qwen3moe_kernels/bench/machine.py
# DEFAULT_TOKENS) and issue 4's (1, 8, 64, 512, 4096, 16384).
DECODE_TOKENS = (1, 8, 64)
PREFILL_TOKENS = (512, 2048, 4096, 8192, 16384)
# The MoE ops, in forward order; each has a backward cost too (op_cost(..., backward=True)).
MOE_OPS = ("router_linear", "router_topk", "moe_permute", "grouped_swiglu", "moe_unpermute")

# TFLOP/s dense bf16 and GB/s. "measured" is None where nobody measured it yet.
PEAKS = {
    "H100": {"nominal": {"tflops": 989.0, "gbps": 3350.0, "source": "H100 SXM5 datasheet (dense bf16, HBM3)"},
             "measured": {"tflops": 798.0, "gbps": 3000.0,
                          "source": "device notes of this workplace, 2026-11-13 (torch bf16 8192^3 matmul on random "
                                    "data; device-to-device copy, bytes read+written); not yet by tools/gpu_run.py"}},
    "H200": {"nominal": {"tflops": 989.0, "gbps": 4800.0, "source": "H200 SXM datasheet (dense bf16, HBM3e)"},
             "measured": {"tflops": 788.0, "gbps": 4300.0,
                          "source": "device notes of this workplace, 2026-10-28 (torch bf16 8192^3 matmul on random "
                                    "data; device-to-device copy); not yet by tools/gpu_run.py"}},
    "B200": {"nominal": {"tflops": 2250.0, "gbps": 8000.0, "source": "B200 datasheet (dense bf16, HBM3e)"},
             "measured": None},
}

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def active_experts(T: int, E: int, k: int) -> float:
    """Expected number of distinct experts hit by T tokens choosing k of E uniformly."""
    if T <= 0:
        return 0.0
    return E * (1.0 - (1.0 - k / E) ** T)


def model_dims(model) -> dict:
    """A model's dims: a name in MODELS, or a dict of the MODELS keys (hidden, inter, experts, top_k, and for
    qk_norm_rope head_dim, q_heads, kv_heads); keys it leaves out come from Qwen3-30B-A3B."""
    if isinstance(model, str):
        return MODELS[model]
    return {**MODELS["Qwen3-30B-A3B"], **model}


def op_cost(op: str, model, T: int, dtype: str = "bf16", backward: bool = False,
            active: float | None = None) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call of ``op`` on T tokens of ``model`` (a name or dims, see model_dims).

    Ops: router_linear (x @ Wr^T), router_topk (softmax + top-k of fp32 logits), moe_permute (gather tokens into
    expert order), grouped_swiglu (gate_up GEMM, SwiGLU, down GEMM over the routed rows), moe_unpermute (weighted
    combine back to tokens), rms_norm, qk_norm_rope (per-head RMSNorm + RoPE of q and k), fused_moe (the sum of the
    MoE ops, intermediates kept in memory between them as the unfused pipeline does).

    ``backward=True``: the backward pass alone, for the MoE ops and fused_moe (the gradients of x, the routing
    weights and every weight; a forward + backward floor is the sum of both). Its FLOPs are twice the forward
    GEMMs' (the input and the weight gradient) plus the elementwise work; its bytes read the output gradient,
    the forward inputs and the weights once and write each gradient once, the weight gradients as the dense
    [E, ...] tensors autograd returns (all E experts, zeros for those no token hit). Intermediates the forward
    could keep or recompute (gate/up, softmax) are not counted: the floor is a limit.

    ``active``: the number of distinct experts hit (default: the expectation under uniform routing).
    """
    m = model_dims(model)
    H, I, E, k = m["hidden"], m["inter"], m["experts"], m["top_k"]
    b = _BYTES[dtype]
    R = T * k  # routed rows
    hit = active_experts(T, E, k) if active is None else float(active)
    if op == "fused_moe":
        costs = [op_cost(p, m, T, dtype, backward, active) for p in MOE_OPS]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)
    if backward:
        if op == "router_linear":  # dx = dlogits @ Wr, dWr = dlogits^T @ x
            return 4.0 * T * H * E, 4.0 * T * E + b * (T * H + E * H) + b * (T * H + E * H)
        if op == "router_topk":  # d(routing weights) [T, k] -> dlogits [T, E] through the softmax
            return 4.0 * T * E, 8.0 * R + 4.0 * T * E + 4.0 * T * E
        if op == "moe_permute":  # scatter-add the k routed rows of each token back: dx
            return 1.0 * R * H, b * (R * H + T * H) + 4.0 * R
        if op == "grouped_swiglu":  # d(rows in) and dW of both GEMMs; SwiGLU backward ~8 per [R, I] element
            flops = 2 * (2.0 * R * H * 2 * I + 2.0 * R * I * H) + 8.0 * R * I
            reads = b * (R * H + R * H) + hit * 3 * H * I * b  # d(rows out), rows in, the hit experts' weights
            writes = b * R * H + E * 3 * H * I * b  # d(rows in), dense weight gradients
            return flops, reads + writes
        if op == "moe_unpermute":  # d(rows out) = w * dy, d(routing weights) = <dy, rows out>
            return 3.0 * R * H, b * (T * H + R * H + R * H) + 4.0 * R + 4.0 * R
        raise ValueError(f"no backward cost for {op!r}: backward is counted for {MOE_OPS + ('fused_moe',)}")
    if op == "router_linear":
        return 2.0 * T * H * E, b * (T * H + E * H) + 4.0 * T * E
    if op == "router_topk":  # fp32 logits in; fp32 weights and int32 ids out; exp + compare per logit
        return 5.0 * T * E, 4.0 * T * E + 8.0 * R
    if op == "moe_permute":
        return 0.0, b * (T * H + R * H) + 4.0 * R * 2
    if op == "grouped_swiglu":
        flops = 2.0 * R * H * 2 * I + 2.0 * R * I * H + 4.0 * R * I
        weights = hit * 3 * H * I * b
        return flops, weights + b * (R * H + R * H)
    if op == "moe_unpermute":
        return 2.0 * R * H, b * (R * H + T * H) + 8.0 * R
    if op == "rms_norm":
        return 4.0 * T * H, b * (2 * T * H + H)
    if op == "qk_norm_rope":
        D, Hq, Hk = m["head_dim"], m["q_heads"], m["kv_heads"]
        n = T * (Hq + Hk) * D
        return 10.0 * n, b * (2 * n + 2 * D) + b * 2 * T * D
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


OPS = MOE_OPS + ("rms_norm", "qk_norm_rope", "fused_moe")
DIRECTIONS = ("fwd", "fwd+bwd")


def limit_time(flops: float, nbytes: float, peak: dict) -> dict:
    """Least time (microseconds) at the given peak: compute, memory, the floor (their max) and which bounds."""
    t_c = flops / (peak["tflops"] * 1e12) * 1e6 if peak.get("tflops") else 0.0
    t_m = nbytes / (peak["gbps"] * 1e9) * 1e6 if peak.get("gbps") else 0.0
    return {"compute_us": t_c, "memory_us": t_m, "floor_us": max(t_c, t_m),
            "bound": "compute" if t_c >= t_m else "memory"}


def peak_for(device: str, kind: str = "measured") -> tuple[dict, str]:
    """(peak, label): the measured peak where there is one, else the nominal one, labelled which."""
    entry = PEAKS[device]
    if kind == "measured" and entry.get("measured"):
        return entry["measured"], f"{device} measured limit"
    return entry["nominal"], f"{device} NOMINAL limit (datasheet; not measured)"


def row_floor(op: str, tokens: int, model="Qwen3-30B-A3B", dtype: str = "bf16", direction: str = "fwd",
              peak: dict | None = None, device: str = "H100", active: float | None = None) -> dict:
    """The roofline floor of one benchmark row: what the bench calls for each (op, T) it times.

    ``direction``: "fwd" or "fwd+bwd" (forward plus backward; MoE ops and fused_moe only). ``peak``: {"tflops",
    "gbps"} (e.g. :func:`device_peak` on the GPU being benchmarked); without it ``device``'s table entry
    (measured where there is one, else nominal, labelled so). ``active``: distinct experts actually hit.
    Returns flops, bytes, compute_us, memory_us, floor_us, bound ("compute" / "memory"), limit (where the peak
    came from), peak_tflops and peak_gbps. A measured time's fraction of the limit is floor_us / measured_us.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    f, nb = op_cost(op, model, tokens, dtype, active=active)
    if direction == "fwd+bwd":
        fb, nbb = op_cost(op, model, tokens, dtype, backward=True, active=active)
        f, nb = f + fb, nb + nbb
    if peak is None:
        peak, label = peak_for(device)
    else:
        label = peak.get("label") or f"limit measured on {peak.get('device', 'this GPU')}"
    return dict(flops=f, bytes=nb, limit=label, peak_tflops=peak.get("tflops"), peak_gbps=peak.get("gbps"),
                **limit_time(f, nb, peak))


def floors(device: str = "H100", dtype: str = "bf16", kind: str = "measured", peak: dict | None = None,
           label: str | None = None) -> list[dict]:
    """One row per (model, phase, T, op, pass): FLOPs, bytes and the limit times. ``peak`` overrides the
    table's. Every op forward; fused_moe also forward + backward."""
    if peak is None:
        peak, label = peak_for(device, kind)
    peak = {**peak, "label": label or f"limit measured on {peak.get('device', 'this GPU')}"}
    rows = []
    for model in MODELS:
        for phase, Ts in (("decode", DECODE_TOKENS), ("prefill", PREFILL_TOKENS)):
            for T in Ts:
                for op, direction in [(op, "fwd") for op in OPS] + [("fused_moe", "fwd+bwd")]:
                    r = row_floor(op, T, model, dtype, direction, peak)
                    rows.append(dict(model=model, phase=phase, tokens=T, op=op, direction=direction, dtype=dtype,
                                     **r))
    return rows


def fraction_of_limit(measured_us: float, model: str, op: str, T: int, dtype: str = "bf16",
                      peak: dict | None = None, device: str = "H100", direction: str = "fwd") -> float:
    """floor / measured: 1.0 means the op ran at the device limit."""
    return row_floor(op, T, model, dtype, direction, peak, device)["floor_us"] / measured_us


# ------------------------------------------------------------------------------------- measuring (GPU)


def measure_peaks(device="cuda", n: int = 8192, copy_bytes: int = 1 << 30, reps: int = 10) -> dict:
    """Measure the bf16 matmul rate (n x n x n, random data) and device-to-device copy bandwidth (bytes read +
    written) on the current GPU: median of ``reps`` event-timed runs after 3 warm-ups. Needs CUDA."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("measure_peaks needs a CUDA device")

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e-3)
        return statistics.median(ts)

    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    t_mm = timed(lambda: torch.mm(a, b, out=c))
    del a, b, c
    src = torch.randn(copy_bytes // 4, device=dev, generator=g)
    dst = torch.empty_like(src)
    t_cp = timed(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {"tflops": 2.0 * n ** 3 / t_mm / 1e12, "gbps": 2.0 * copy_bytes / t_cp / 1e9,
            "source": f"measured: torch.mm bf16 {n}^3 random, copy of {copy_bytes >> 20} MiB (read+write), "
                      f"median of {reps}",
            "device": torch.cuda.get_device_name(dev)}


@functools.lru_cache(maxsize=None)
def _measured(device: str) -> dict:
    return measure_peaks(device)


def device_peak(device="cuda", dtype=None) -> dict | None:
    """Measured peak of the current GPU (once per process; benchmarks use it for fractions). None off-GPU."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    return _measured(f"cuda:{idx}")


# --------------------------------------------------------------------------------------------- CLI


def format_floors(rows: list[dict]) -> str:
    out = [f"{'model':16} {'phase':8} {'T':>5} {'op':15} {'pass':8} {'GFLOP':>10} {'MB':>10} {'compute us':>11} "
           f"{'memory us':>10} {'FLOOR us':>9} bound"]
    for r in rows:
        out.append(f"{r['model']:16} {r['phase']:8} {r['tokens']:>5} {r['op']:15} {r.get('direction', 'fwd'):8} "
                   f"{r['flops'] / 1e9:>10.3f} "
                   f"{r['bytes'] / 1e6:>10.3f} {r['compute_us']:>11.2f} {r['memory_us']:>10.2f} "
                   f"{r['floor_us']:>9.2f} {r['bound']}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="roofline floors (limits, not results) at the Qwen3-MoE shapes")
    p.add_argument("--device", default="H100", choices=list(PEAKS))
    p.add_argument("--dtype", default="bf16", choices=list(_BYTES))
    p.add_argument("--nominal", action="store_true", help="use the datasheet peak even where a measured one exists")
    a = p.parse_args(argv)
    rows = floors(a.device, a.dtype, "nominal" if a.nominal else "measured")
    print(f"LIMITS at {rows[0]['limit']}: {rows[0]['peak_tflops']} TFLOP/s, {rows[0]['peak_gbps']} GB/s "
          f"({PEAKS[a.device]['measured' if not a.nominal and PEAKS[a.device]['measured'] else 'nominal']['source']})")
    print(format_floors(rows))
    return 0



# ------------------------------------------------------------------ expert parallelism: communication on paper

# Per GPU and per direction, GB/s: NOMINAL link rates (datasheets), not measured.
LINKS = {
    "nvlink": {"gbps": 450.0, "source": "H100 SXM NVLink 4: 900 GB/s bidirectional, 450 GB/s per direction"},
    "infiniband": {"gbps": 50.0, "source": "one 400 Gb/s InfiniBand NIC per GPU (DGX H100): 50 GB/s per direction"},
}
# Where the experts of one layer are spread: nodes x GPUs per node; NVLink inside a node, InfiniBand between.
EP_SETUPS = {"1 node x 8": (1, 8), "2 nodes x 8": (2, 8), "4 nodes x 8": (4, 8)}
EP_TOKENS = (1, 8, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def ep_token_bytes(model, dtype: str = "bf16") -> float:
    """Bytes one token moves per MoE layer under expert parallelism: its k rows of H to the experts' ranks
    (dispatch) and back (combine), ``2 * k * H * dtype size`` (Qwen3-235B-A22B in bf16: 131 KB)."""
    m = model_dims(model)
    return 2.0 * m["top_k"] * m["hidden"] * _BYTES[dtype]


def ep_layer_time(model, tokens_per_rank: int, nodes: int, gpus_per_node: int, dtype: str = "bf16",
                  peak: dict | None = None, device: str = "H100") -> dict:
    """One MoE layer on one rank of ``nodes x gpus_per_node`` under expert parallelism, at the limits (uniform,
    balanced routing; no overlap assumed or needed to compare the two):

    * exchange: of a token's ``ep_token_bytes``, the share whose expert is on another GPU of the node crosses
      NVLink ((g-1)/world), on another node InfiniBand ((world-g)/world); dispatch and combine each run both ways
      at once, so each link's time is its bytes over its per-direction rate; the two links work in parallel;
    * experts: the rows this rank receives (T*k in expectation) through its E/world experts, ``grouped_swiglu``'s
      floor (``op_cost``) at the device's peak (measured where there is one).

    Link latency (tens of microseconds per all-to-all, the decode cost) is not in this bandwidth model."""
    m = model_dims(model)
    world = nodes * gpus_per_node
    per_token = ep_token_bytes(m, dtype) * tokens_per_rank
    nvlink_bytes = per_token * (gpus_per_node - 1) / world
    ib_bytes = per_token * (world - gpus_per_node) / world
    nvlink_us = nvlink_bytes / (LINKS["nvlink"]["gbps"] * 1e9) * 1e6
    ib_us = ib_bytes / (LINKS["infiniband"]["gbps"] * 1e9) * 1e6
    local = {**m, "experts": m["experts"] // world, "top_k": 1}  # the rows received, each for one local expert
    flops, nbytes = op_cost("grouped_swiglu", local, tokens_per_rank * m["top_k"], dtype)
    if peak is None:
        peak, _ = peak_for(device)
    experts = limit_time(flops, nbytes, peak)
    comm_us = max(nvlink_us, ib_us)
    return {"tokens_per_rank": tokens_per_rank, "world": world, "bytes_per_token": ep_token_bytes(m, dtype),
            "nvlink_us": nvlink_us, "infiniband_us": ib_us, "comm_us": comm_us, "experts_us": experts["floor_us"],
            "experts_bound": experts["bound"], "comm_over_experts": comm_us / experts["floor_us"],
            "bandwidth_bound": comm_us > experts["floor_us"]}


def ep_bandwidth_bound_from(model, nodes: int, gpus_per_node: int, dtype: str = "bf16", device: str = "H100",
                            max_tokens: int = 1 << 20) -> int | None:
    """The fewest tokens per rank at which the exchange outlasts the experts' floor, or None if it never does up
    to ``max_tokens``. Bisection: the ratio grows with T (the exchange is linear in T; the floor is flat while it
    reads the weights, sublinear while more experts get hit, linear once compute-bound), so once bound, always."""
    def bound(t):
        return ep_layer_time(model, t, nodes, gpus_per_node, dtype, device=device)["bandwidth_bound"]

    if not bound(max_tokens):
        return None
    lo, hi = 0, max_tokens  # not bound at lo (T = 0 moves nothing), bound at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if bound(mid) else (mid, hi)
    return hi


def ep_rows(dtype: str = "bf16", device: str = "H100", tokens=EP_TOKENS) -> list[dict]:
    """The communication model's table: per model, setup and tokens per rank (see :func:`ep_layer_time`)."""
    rows = []
    for model in MODELS:
        for setup, (nodes, g) in EP_SETUPS.items():
            for t in tokens:
                rows.append(dict(model=model, setup=setup, **ep_layer_time(model, t, nodes, g, dtype,
                                                                           device=device)))
    return rows


def ep_main(argv=None) -> int:
    """``python -m qwen3moe_kernels.roofline ep [--device H100] [--dtype bf16]``: the EP communication table."""
    p = argparse.ArgumentParser(prog="python -m qwen3moe_kernels.roofline ep",
                                description="expert parallelism on paper: exchange vs the experts' floor (limits)")
    p.add_argument("--device", default="H100", choices=list(PEAKS))
    p.add_argument("--dtype", default="bf16", choices=list(_BYTES))
    a = p.parse_args(argv)
    _, label = peak_for(a.device)
    print(f"LIMITS: experts at {label}; links NOMINAL: " + "; ".join(v["source"] for v in LINKS.values()))
    print(f"{'model':16} {'setup':12} {'T/rank':>6} {'KB/token':>8} {'NVLink us':>9} {'IB us':>8} "
          f"{'experts us':>10} {'comm/exp':>8} bound")
    for r in ep_rows(a.dtype, a.device):
        print(f"{r['model']:16} {r['setup']:12} {r['tokens_per_rank']:>6} {r['bytes_per_token'] / 1e3:>8.1f} "
              f"{r['nvlink_us']:>9.1f} {r['infiniband_us']:>8.1f} {r['experts_us']:>10.1f} "
              f"{r['comm_over_experts']:>8.2f} {'exchange' if r['bandwidth_bound'] else 'experts'}")
    for model in MODELS:
        for setup, (nodes, g) in EP_SETUPS.items():
            t = ep_bandwidth_bound_from(model, nodes, g, a.dtype, a.device)
            print(f"{model} on {setup}: " + ("never bandwidth-bound" if t is None
                                            else f"bandwidth-bound from {t} tokens per rank"))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(ep_main(sys.argv[2:]) if sys.argv[1:2] == ["ep"] else main())
