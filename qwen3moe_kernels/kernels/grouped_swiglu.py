"""Grouped-GEMM SwiGLU experts of the sparse MoE block, in Triton.

Computes, for every token-slot ``s = t*k + j`` routed to expert ``e = ids[t, j]``:

    h[s] = silu(x[t] @ Wg[e].T) * (x[t] @ Wu[e].T)          (kernel 1, ``gate_up``; W = w_gate_up[e] = [2I, H])
    y[s] = weights[t, j] * (h[s] @ w_down[e].T)              (kernel 2, ``down``; w_down[e] = [H, I])

Algorithm: the slots are grouped by expert and each group padded to a multiple of ``BLOCK_M``
(``moe_align_block``: ``padded_slots``, ``block_expert``, ``num_padded``). One program owns BLOCK_M padded slots
of one expert and a BLOCK_N column tile. Kernel 1 gathers the rows of ``x`` by ``slot // top_k`` inside the
kernel (no permuted copy of x), runs two ``tl.dot`` accumulators (gate and up columns of the same tile) and
applies SiLU(gate)*up in the epilogue. Kernel 2 gathers rows of ``h`` by slot and scales by the routing weight in
the epilogue. Both write their rows at the slot index itself, so ``y`` is ``[T*k, H]`` in token order and the
combine over the k slots of a token is a fixed-order fp32 sum (deterministic, no atomics).

Layout: x [T, H], w_gate_up [E, 2I, H] (gate rows first, as transformers), w_down [E, H, I], all contiguous;
h [T*k, I] in x's dtype; y [T*k, H] fp32. Padding slots hold the sentinel ``T*k`` and are masked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .spec import CompileSpec


@triton.jit
def grouped_swiglu_gate_up_kernel(
    x_ptr,  # [T, H] activations
    w_ptr,  # [E, 2I, H] packed gate/up weights
    h_ptr,  # [T*k, I] output, row = slot
    padded_slots_ptr,  # [P_max] int32 slots grouped by expert, sentinel T*k for padding
    block_expert_ptr,  # [P_max // BLOCK_M] int32 expert of each block, -1 past num_padded
    num_slots,  # T*k (the sentinel)
    H,
    I,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < num_slots
    tokens = tl.where(row_ok, slots // TOP_K, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * 2 * I * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        a = tl.load(x_ptr + tokens[:, None] * H + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # B tiles are [BLOCK_K, BLOCK_N] views of the row-major [2I, H] weight (K contiguous).
        bg = tl.load(w_base + offs_n[None, :].to(tl.int64) * H + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        bu = tl.load(w_base + (offs_n[None, :] + I).to(tl.int64) * H + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_rows = tl.where(row_ok, slots, 0).to(tl.int64)
    tl.store(h_ptr + out_rows[:, None] * I + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_swiglu_down_kernel(
    h_ptr,  # [T*k, I] SwiGLU activations, row = slot
    w_ptr,  # [E, H, I] down weights
    rw_ptr,  # [T*k] fp32 routing weights, row = slot
    y_ptr,  # [T*k, H] fp32 output, row = slot
    padded_slots_ptr,
    block_expert_ptr,
    num_slots,
    H,
    I,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < num_slots
    rows = tl.where(row_ok, slots, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * H * I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < I
        a = tl.load(h_ptr + rows[:, None] * I + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + offs_n[None, :].to(tl.int64) * I + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
    acc = acc * rw[:, None]
    tl.store(y_ptr + rows[:, None] * H + offs_n[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def default_config(num_slots: int) -> dict:
    """Heuristic tiles: small BLOCK_M for decode (few slots per expert), large for prefill."""
    if num_slots <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if num_slots <= 4096:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def gate_up(x, w_gate_up, padded_slots, block_expert, top_k: int, config: dict):
    """Launch kernel 1. Returns h [T*k, I] in x's dtype (rows of slots never routed are left unwritten: none)."""
    import torch

    T, H = x.shape
    I = w_gate_up.shape[1] // 2
    h = torch.empty((T * top_k, I), dtype=x.dtype, device=x.device)
    bm = config["BLOCK_M"]
    grid = (block_expert.numel(), triton.cdiv(I, config["BLOCK_N"]))
    grouped_swiglu_gate_up_kernel[grid](
        x, w_gate_up, h, padded_slots, block_expert, T * top_k, H, I,
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )
    return h


def down(h, w_down, routing_weights, padded_slots, block_expert, config: dict):
    """Launch kernel 2. ``routing_weights`` is [T, k] fp32; returns y [T*k, H] fp32 (weighted)."""
    import torch

    S, I = h.shape
    H = w_down.shape[1]
    y = torch.empty((S, H), dtype=torch.float32, device=h.device)
    grid = (block_expert.numel(), triton.cdiv(H, config["BLOCK_N"]))
    grouped_swiglu_down_kernel[grid](
        h, w_down, routing_weights.reshape(-1).float().contiguous(), y, padded_slots, block_expert, S, H, I,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )
    return y


_SHAPES = {"30B-A3B": (2048, 768), "235B-A22B": (4096, 1536)}
_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_specs() -> list[CompileSpec]:
    specs = []
    for model, (hidden, inter) in _SHAPES.items():
        for phase, slots in (("decode", 8), ("prefill", 8 * 4096), ("mid", 8 * 64)):
            cfg = default_config(slots)
            tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
            for dt in ("bf16", "fp16", "fp32"):
                p = _DT[dt]
                label = f"{model} {phase} {dt} BM={tiles['BLOCK_M']} BN={tiles['BLOCK_N']} BK={tiles['BLOCK_K']}"
                specs.append(CompileSpec(
                    kernel="grouped_swiglu_gate_up_kernel", fn=grouped_swiglu_gate_up_kernel,
                    signature={"x_ptr": p, "w_ptr": p, "h_ptr": p, "padded_slots_ptr": "*i32",
                               "block_expert_ptr": "*i32", "num_slots": "i32", "H": "i32", "I": "i32",
                               "TOP_K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                               "BLOCK_K": "constexpr"},
                    constexprs={"TOP_K": 8, **tiles}, label=label,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], gemm=True,
                    ints={"num_slots": slots, "H": hidden, "I": inter}))
                specs.append(CompileSpec(
                    kernel="grouped_swiglu_down_kernel", fn=grouped_swiglu_down_kernel,
                    signature={"h_ptr": p, "w_ptr": p, "rw_ptr": "*fp32", "y_ptr": "*fp32",
                               "padded_slots_ptr": "*i32", "block_expert_ptr": "*i32", "num_slots": "i32",
                               "H": "i32", "I": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                               "BLOCK_K": "constexpr"},
                    constexprs=dict(tiles), label=label,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], gemm=True,
                    ints={"num_slots": slots, "H": hidden, "I": inter}))
    return specs
