"""Triton kernels of the grouped-GEMM SwiGLU experts, forward and backward, with their launchers and launch configs.

Kernels: ``gate_up`` (gather GEMM of x with the [gate; up] weights, SwiGLU in the epilogue), ``down`` (gather GEMM
with the routing weight in the epilogue), ``sum_slots`` (the fixed-order fp32 k-slot sum), ``down_bwd`` (dgate/dup
with the SwiGLU backward, and the routing-weight gradient), ``dx``, ``wgrad`` (per-expert A^T B). Layout: x [T, H],
w_gate_up [E, 2I, H], w_down [E, H, I], contiguous; per-slot rows [T*k, ...] in slot order; slots grouped by
``moe_align_block`` (gather GEMMs) or ``moe_sort`` (wgrad). Algorithm, rounding and configs:
``docs/ops/grouped_swiglu.md``; the orchestration: ``ops/grouped_swiglu_triton.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import triton
import triton.language as tl

from .spec import CompileSpec, one_per_variant


@triton.jit
def _tile(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M M blocks sweep all N tiles before the next group starts."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


# The gate's activation, a constexpr of the gate_up and down_bwd kernels: its index in ACTIVATIONS.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# gelu_tanh's sqrt(2 / pi) and cubic coefficient (a @triton.jit function reads only constexpr globals)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _act(g, ACTIVATION: tl.constexpr):
    """act(g) of an fp32 tile: silu, gelu (erf), gelu (tanh approximation) or relu."""
    if ACTIVATION == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACTIVATION == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = _SQRT_2_OVER_PI * (g + _GELU_TANH_C * g * g * g)
        return 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * u)))  # 1 + tanh(u) = 2 * sigmoid(2u)
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) of an fp32 tile, for the backward epilogue."""
    if ACTIVATION == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACTIVATION == 2:
        u = _SQRT_2_OVER_PI * (g + _GELU_TANH_C * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_TANH_C * g * g)
    else:
        return tl.maximum(g, 0.0), tl.where(g > 0.0, 1.0, 0.0)


@triton.jit
def grouped_swiglu_gate_up_kernel(
    x_ptr,  # [T, H] activations
    w_ptr,  # [E, 2I, H] packed gate/up weights
    h_ptr,  # [T*k, I] output, row = slot
    gu_ptr,  # [T*k, 2I] gate/up pre-activations, row = slot (written only when STORE_GU: the backward needs them)
    padded_slots_ptr,  # [P_max] int32 slots grouped by expert, sentinel T*k for padding
    block_expert_ptr,  # [P_max // BLOCK_M] int32 expert of each block, -1 past num_padded
    num_slots,  # T*k (the sentinel)
    num_pid_m,  # M blocks launched: P_max // BLOCK_M capped by how many can hold slots (m_blocks)
    H,
    I,
    TOP_K: tl.constexpr,
    STORE_GU: tl.constexpr,
    ACTIVATION: tl.constexpr,  # the gate's activation: its index in ACTIVATIONS
    PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32x3" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
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
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    out_rows = tl.where(row_ok, slots, 0).to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    if STORE_GU:
        gu_rows = gu_ptr + out_rows[:, None] * 2 * I + offs_n[None, :]
        tl.store(gu_rows, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_rows + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)
    h = _act(acc_g, ACTIVATION) * acc_u
    tl.store(h_ptr + out_rows[:, None] * I + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_swiglu_down_kernel(
    h_ptr,  # [T*k, I] SwiGLU activations, row = slot
    w_ptr,  # [E, H, I] down weights
    rw_ptr,  # [T*k] fp32 routing weights, row = slot
    y_ptr,  # [T*k, H] output in h's dtype (weighted), row = slot
    padded_slots_ptr,
    block_expert_ptr,
    num_slots,
    num_pid_m,
    H,
    I,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
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
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # the routing weight rounded to the activations' dtype (as transformers multiplies in it), applied to the fp32
    # accumulator, then one rounding to the output dtype (16-bit: half the bytes of an fp32 per-slot buffer; the
    # k slots of a token are summed in fp32 afterwards)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
    acc = acc * rw[:, None]
    tl.store(y_ptr + rows[:, None] * H + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_swiglu_down_bwd_kernel(
    dout_ptr,  # [T, H] gradient of the block output
    w_ptr,  # [E, H, I] down weights (B[k, n] = w[e, k, n]: N contiguous)
    h_ptr,  # [T*k, I] the forward's SwiGLU activations, row = slot
    gu_ptr,  # [T*k, 2I] gate/up pre-activations saved by the forward, row = slot
    rw_ptr,  # [T*k] fp32 routing weights
    dgu_ptr,  # [T*k, 2I] output: gradient of the gate/up pre-activations, row = slot
    drw_ptr,  # [cdiv(I, BLOCK_N), T*k] fp32 output: this N tile's part of <g[s], h[s]>
    padded_slots_ptr,
    block_expert_ptr,
    num_slots,
    num_pid_m,
    H,
    I,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < num_slots
    tokens = tl.where(row_ok, slots // TOP_K, 0).to(tl.int64)
    rows = tl.where(row_ok, slots, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * H * I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        a = tl.load(dout_ptr + tokens[:, None] * H + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + kk[:, None].to(tl.int64) * I + offs_n[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # Epilogue: the gated activation's backward and this tile's share of the routing-weight gradient.
    # It reads gate/up as the forward stored them (rounded to the activations' dtype), while the forward's h came
    # from the fp32 accumulators: for 16-bit inputs act'(gate) and up carry one extra rounding (~2^-8 relative in
    # bf16), well within the gradient tolerances (twice PyTorch's own bf16 error, which rounds gate/up too). Keeping
    # them exact would need an fp32 gu buffer: twice its memory and traffic.
    mask = row_ok[:, None] & col_ok[None, :]
    gu_rows = gu_ptr + rows[:, None] * 2 * I + offs_n[None, :]
    gate = tl.load(gu_rows, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_rows + I, mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _act_and_grad(gate, ACTIVATION)
    # h exactly as the forward used it (not recomputed from the rounded gate/up): drw = <dout, y_unweighted>
    h = tl.load(h_ptr + rows[:, None] * I + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    part = tl.sum(tl.where(mask, acc * h, 0.0), axis=1)
    tl.store(drw_ptr + pid_n.to(tl.int64) * num_slots + rows, part, mask=row_ok)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0).to(h_ptr.dtype.element_ty).to(tl.float32)  # as the forward
    dh = acc * rw[:, None]
    dgate = dh * up * act_grad
    dup = dh * act
    dgu_rows = dgu_ptr + rows[:, None] * 2 * I + offs_n[None, :]
    tl.store(dgu_rows, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_rows + I, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_swiglu_dx_kernel(
    dgu_ptr,  # [T*k, 2I] gradient of the gate/up pre-activations, row = slot
    w_ptr,  # [E, 2I, H] gate/up weights (B[k, n] = w[e, k, n]: N contiguous)
    dxs_ptr,  # [T*k, H] output in dgu's dtype: each slot's contribution to dx, row = slot
    padded_slots_ptr,
    block_expert_ptr,
    num_slots,
    num_pid_m,
    H,
    I2,  # 2I, the reduction length
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
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
    w_base = w_ptr + e.to(tl.int64) * I2 * H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I2, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < I2
        a = tl.load(dgu_ptr + rows[:, None] * I2 + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + kk[:, None].to(tl.int64) * H + offs_n[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # one rounding to the dtype; the k slots of a token are summed in fp32 afterwards (as the forward's y)
    tl.store(dxs_ptr + rows[:, None] * H + offs_n[None, :], acc.to(dxs_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_swiglu_wgrad_kernel(
    a_ptr,  # rows of A: a_ptr[(slot // A_DIV) * M + m]   (dout [T, H] or dgu [T*k, 2I])
    b_ptr,  # rows of B: b_ptr[(slot // B_DIV) * N + n]   (h [T*k, I] or x [T, H])
    rw_ptr,  # [T*k] fp32 scale of A's rows (read when SCALE_A)
    c_ptr,  # [E, M, N] output: c[e] = sum over e's slots of A[row]^T B[row]
    sorted_slots_ptr,  # [T*k] int32 slots grouped by expert (moe_sort)
    offsets_ptr,  # [E+1] int32 start of each expert's group
    M,
    N,
    A_DIV: tl.constexpr,
    B_DIV: tl.constexpr,
    SCALE_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.program_id(1)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rr = r0 + offs_k
        r_ok = rr < end
        slot = tl.load(sorted_slots_ptr + rr, mask=r_ok, other=0)
        ra = (slot // A_DIV).to(tl.int64)
        rb = (slot // B_DIV).to(tl.int64)
        # A^T tile [BLOCK_M, BLOCK_K]: column r is row ra[r] of A (contiguous along m)
        a = tl.load(a_ptr + ra[None, :] * M + offs_m[:, None], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if SCALE_A:
            rw = tl.load(rw_ptr + slot, mask=r_ok, other=0.0).to(a_ptr.dtype.element_ty).to(tl.float32)
            a = (a.to(tl.float32) * rw[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + rb[:, None] * N + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c = c_ptr + e.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])



@triton.jit
def grouped_swiglu_sum_slots_kernel(
    y_ptr,  # [T*k, H] per-slot rows in slot order (token t's rows are t*k .. t*k + k - 1)
    out_ptr,  # [T, H] output in y's dtype
    H,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j y[t*k + j]: fp32 accumulation in the order j = 0..k-1, one rounding (what moe_unpermute
    computes with unit weights and the identity order, bit for bit, without those two tensors)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

# ------------------------------------------------------------------------------------------------- configs
#
# Why these tiles (no GPU has run them yet; tuned tables replace them when one is lent, see below):
# With r = T*k / E rows per expert, each expert weight byte read from HBM feeds about r FLOPs (2r per bf16
# element), so the expert GEMMs stay bound by weight bandwidth up to r ~ 300 on an H100 (~990 TFLOP/s over
# ~3.35 TB/s): at Qwen3-30B-A3B (E = 128, k = 8) that is T up to ~4800 tokens. Below that the tiles must read
# each weight once (GROUP_M swizzling keeps it in L2 across an expert's M blocks) with enough programs in
# flight, and the padding of each expert's last M block costs no bandwidth (its x rows are masked off); above
# it, tensor-core efficiency decides, and BLOCK_M = 128 wastes at most ~BLOCK_M/2 of >= 300 rows per expert.
# * decode (T*k <= 64 slots, so 1 to 8 tokens per expert): the GEMMs are bound by reading the expert weights
#   (each touched weight byte is used by a handful of rows). BLOCK_M = 16 wastes the least work on padding;
#   Triton lowers M = 16 tiles to mma.sync (wgmma needs 64 rows), which is fine when the weights' bandwidth,
#   not the tensor cores, is the limit. A long BLOCK_K (128) keeps many bytes in flight per program, and the
#   N tiles are narrow enough that a single token's 8 experts give more programs than the GPU has SMs
#   (bandwidth needs every SM streaming). Split-K would add parallelism further; not done yet.
# * mid (up to 4096 slots, ~32 rows per expert at E = 128): 64 x 64 tiles, the smallest that use wgmma.
# * prefill: 128 x 128 output tiles with BLOCK_K = 64 (8 warps, 3 stages): per K step 16 KB of A and 16 KB of B
#   (bf16) feed 128*128*64*2 FLOPs, the intensity wgmma needs to approach peak; 3 stages keep TMA-free loads in
#   flight within 227 KB of shared memory. The gate/up kernel runs two accumulators (gate and up columns of the
#   same N tile), so its BLOCK_N = 64 already is an effective 128-wide tile; down_bwd, whose SwiGLU-backward
#   epilogue holds several tiles, runs 64 x 64 on 8 warps (see default_config). GROUP_M = 8 swizzling makes the
#   weight tiles of one expert L2-resident across its M blocks. fp32 inputs (tf32x3) halve BLOCK_K to fit
#   shared memory. compile-check compiles all of them for sm_90/sm_100 and fails on spills or on missing
#   wgmma/tcgen05/mma instructions.
# The wgrad kernel's M x N tile is a block of one expert's weight gradient; its K loop runs over that expert's
# slots, so decode uses a short BLOCK_K.

# Tuned tables (none shipped yet: they are only written from GPU measurements, by tools/tune_grouped_swiglu.py).
# One JSON file per device in ``configs/`` beside this file (what setup.py's package_data ships), named
# ``grouped_swiglu_<device>.json`` with the device name sanitized (``table_path``), e.g.
# ``configs/grouped_swiglu_NVIDIA_H100_80GB_HBM3.json``. Its ``entries`` are measured winners, each keyed by
# kernel, dtype, model shape (H, I, E) and the slot count it was measured at (see configs/README.md). For a launch,
# an entry applies only on an exact (kernel, dtype, H, I, E) match; among those the nearest slot count (in log2;
# ties to the smaller) wins. Anything else falls back to the heuristic below, so a table tuned at one model
# shape is never applied to another. compile_specs() compiles every config of every table in ``configs/``.
CONFIG_DIR = Path(__file__).resolve().with_name("configs")
TUNED: dict = {}  # device name -> {(kernel, dtype, H, I, E): [(slots, config), ...] sorted by slots}


def table_path(device_name: str, config_dir: Path | None = None) -> Path:
    """Where the tuned table of ``device_name`` lives: ``configs/grouped_swiglu_<sanitized name>.json``."""
    safe = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return (CONFIG_DIR if config_dir is None else config_dir) / f"grouped_swiglu_{safe}.json"


def index_table(table: dict) -> dict:
    """{(kernel, dtype, H, I, E): [(slots, config), ...] sorted by slots} from a table's JSON object."""
    index: dict = {}
    for e in table.get("entries", []):
        key = (e["kernel"], e["dtype"], int(e["H"]), int(e["I"]), int(e["E"]))
        index.setdefault(key, []).append((int(e["slots"]), dict(e["config"])))
    return {key: sorted(rows, key=lambda r: r[0]) for key, rows in index.items()}


def _load_tuned(device_name: str) -> dict:
    if device_name not in TUNED:
        path = table_path(device_name)
        TUNED[device_name] = index_table(json.loads(path.read_text())) if path.exists() else {}
    return TUNED[device_name]


def shipped_tables() -> list[Path]:
    """Every tuned table in ``configs/`` (what compile_specs() must compile)."""
    return sorted(CONFIG_DIR.glob("grouped_swiglu_*.json"))


def tuned_config(num_slots: int, kernel: str, dtype: str, device_name: str, shape: tuple) -> dict | None:
    """The tuned entry for an exact (kernel, dtype, H, I, E) match at the nearest measured slot count, or None."""
    rows = _load_tuned(device_name).get((kernel, dtype, *map(int, shape)))
    if not rows:
        return None
    want = math.log2(max(num_slots, 1))
    slots, cfg = min(rows, key=lambda r: abs(math.log2(max(r[0], 1)) - want))  # min keeps the first (smaller) tie
    return dict(cfg)


GATHER_KERNELS = ("gate_up", "down", "down_bwd", "dx")
KERNELS = GATHER_KERNELS + ("wgrad",)


def default_config(num_slots: int, kernel: str = "gate_up", dtype: str = "bf16", device_name: str | None = None,
                   shape: tuple | None = None) -> dict:
    """Launch config of ``kernel`` (``gate_up``, ``down``, ``down_bwd``, ``dx`` or ``wgrad``) for ``num_slots =
    T*k`` slots in ``dtype`` (``bf16``/``fp16``/``fp32``) at model ``shape = (H, I, E)``: the tuned entry of
    ``device_name``'s table for exactly this kernel, dtype and shape if there is one (see ``tuned_config``), else
    the heuristic above (which depends on the slot count only)."""
    if kernel not in KERNELS:
        raise ValueError(f"default_config: unknown kernel {kernel!r}")
    if device_name is not None and shape is not None:
        cfg = tuned_config(num_slots, kernel, dtype, device_name, shape)
        if cfg is not None:
            return cfg
    wide = 4 if dtype == "fp32" else 2  # bytes per element: fp32 tiles use half the BLOCK_K
    if kernel == "wgrad":
        if num_slots <= 64:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
        if num_slots <= 4096:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128 // wide, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if num_slots <= 64:
        # fp32 (tf32x3 on mma.sync) and down_bwd (its epilogue holds gate, up and dgate/dup tiles) spill with
        # longer K tiles at 4 warps
        bk = 32 if dtype == "fp32" else (64 if kernel == "down_bwd" else 128)
        stages = 2 if dtype == "fp32" and kernel == "gate_up" else 3
        # gate_up: 32 columns x 2 accumulators, so that one token (8 experts x I/32 = 192 programs at I = 768)
        # still covers all 132 SMs of an H100; 64 would leave a third of them without weights to stream
        bn = 32 if kernel == "gate_up" else 64
        return {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 4, "num_stages": stages}
    # down_bwd's epilogue holds ~6 fp32 tiles (acc, gate, up, h, dgate, dup). 16-bit: 64 x 64 tiles on 8 warps
    # need 128 registers on sm_90 (128 x 64 on 8 warps, or 64 x 64 on 4, sit at the 255 cap, one change away
    # from spilling). fp32 (tf32x3): a 64-wide tile spills on sm_90, so it narrows to 32.
    if kernel == "down_bwd" and dtype != "fp32" and num_slots > 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    narrow = 32 if kernel == "down_bwd" else 64
    if num_slots <= 4096:
        return {"BLOCK_M": 64, "BLOCK_N": narrow, "BLOCK_K": 128 // wide, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    bn = narrow if kernel in ("gate_up", "down_bwd") else 128  # gate_up: two accumulators; down_bwd: epilogue
    return {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 128 // wide, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


# --------------------------------------------------------------------------------------------- launchers


def dtype_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _precision(dtype) -> str:
    import torch

    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch_opts(cfg: dict) -> dict:
    return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
            "GROUP_M": cfg.get("GROUP_M", 1), "num_warps": cfg.get("num_warps", 4),
            "num_stages": cfg.get("num_stages", 3)}


def m_blocks(num_blocks: int, num_slots: int, num_experts: int, block_m: int) -> int:
    """How many M blocks a gather GEMM launches programs for: ``moe_align_block``'s ``num_blocks``, capped by how
    many blocks can hold slots. Expert e fills ceil(c_e / BLOCK_M) < c_e / BLOCK_M + 1 blocks, so the experts that
    have slots (at most min(E, T*k)) fill fewer than T*k / BLOCK_M + min(E, T*k): a bound from shapes alone (no
    host sync), and the blocks past it are all unused (expert -1). At decode it is what matters: one token's 8
    slots use at most 9 of the 121 blocks of P_max = T*k + E*(BLOCK_M - 1) at E = 128 and BLOCK_M = 16, so 216
    gate_up programs are launched instead of 2904, all but the used ones exiting at once."""
    return min(num_blocks, triton.cdiv(num_slots, block_m) + min(num_experts, num_slots))


def gate_up(x, w_gate_up, padded_slots, block_expert, top_k: int, config: dict, store_gu: bool = False,
            activation: str = "silu"):
    """Kernel 1. Returns ``(h [T*k, I], gu [T*k, 2I] or None)`` in x's dtype."""
    import torch

    T, H = x.shape
    I = w_gate_up.shape[1] // 2
    h = torch.empty((T * top_k, I), dtype=x.dtype, device=x.device)
    gu = torch.empty((T * top_k, 2 * I), dtype=x.dtype, device=x.device) if store_gu else h
    nm = m_blocks(block_expert.numel(), T * top_k, w_gate_up.shape[0], config["BLOCK_M"])
    grid = (nm * triton.cdiv(I, config["BLOCK_N"]),)
    grouped_swiglu_gate_up_kernel[grid](
        x, w_gate_up, h, gu, padded_slots, block_expert, T * top_k, nm, H, I,
        TOP_K=top_k, STORE_GU=store_gu, ACTIVATION=ACTIVATIONS.index(activation), PRECISION=_precision(x.dtype),
        **_launch_opts(config))
    return h, (gu if store_gu else None)


def down(h, w_down, routing_weights, padded_slots, block_expert, config: dict):
    """Kernel 2. ``routing_weights`` is [T, k] fp32; returns the weighted per-slot y [T*k, H] in h's dtype (the
    caller sums each token's k rows in fp32: ``ops.moe_permute.sum_slots``)."""
    import torch

    S, I = h.shape
    H = w_down.shape[1]
    y = torch.empty((S, H), dtype=h.dtype, device=h.device)
    nm = m_blocks(block_expert.numel(), S, w_down.shape[0], config["BLOCK_M"])
    grid = (nm * triton.cdiv(H, config["BLOCK_N"]),)
    grouped_swiglu_down_kernel[grid](
        h, w_down, routing_weights.reshape(-1).float().contiguous(), y, padded_slots, block_expert, S, nm, H, I,
        PRECISION=_precision(h.dtype), **_launch_opts(config))
    return y


def down_bwd(dout, w_down, h, gu, routing_weights, padded_slots, block_expert, top_k: int, config: dict,
             activation: str = "silu"):
    """Backward of kernel 2 and the SwiGLU: returns ``(dgu [T*k, 2I] in gu's dtype, drw [T, k] fp32)``."""
    import torch

    T, H = dout.shape
    S = T * top_k
    I = w_down.shape[2]
    dgu = torch.empty((S, 2 * I), dtype=gu.dtype, device=gu.device)
    n_tiles = triton.cdiv(I, config["BLOCK_N"])
    parts = torch.empty((n_tiles, S), dtype=torch.float32, device=gu.device)
    nm = m_blocks(block_expert.numel(), S, w_down.shape[0], config["BLOCK_M"])
    grouped_swiglu_down_bwd_kernel[(nm * n_tiles,)](
        dout, w_down, h, gu, routing_weights.reshape(-1).float().contiguous(), dgu, parts, padded_slots, block_expert,
        S, nm, H, I, TOP_K=top_k, ACTIVATION=ACTIVATIONS.index(activation), PRECISION=_precision(gu.dtype),
        **_launch_opts(config))
    return dgu, parts.sum(0).reshape(T, top_k)  # fixed-order sum of the per-tile parts: deterministic


def dx(dgu, w_gate_up, padded_slots, block_expert, config: dict):
    """Kernel ``dx``: the per-slot ``dxs[s] = dgu[s] @ w_gate_up[e]``, [T*k, H] in dgu's dtype (the caller sums
    each token's k rows in fp32, as the forward's y)."""
    import torch

    S, I2 = dgu.shape
    H = w_gate_up.shape[2]
    dxs = torch.empty((S, H), dtype=dgu.dtype, device=dgu.device)
    nm = m_blocks(block_expert.numel(), S, w_gate_up.shape[0], config["BLOCK_M"])
    grouped_swiglu_dx_kernel[(nm * triton.cdiv(H, config["BLOCK_N"]),)](
        dgu, w_gate_up, dxs, padded_slots, block_expert, S, nm, H, I2,
        PRECISION=_precision(dgu.dtype), **_launch_opts(config))
    return dxs


SUM_BLOCK_H = 1024  # columns per sum_slots program: 8 16-bit elements per thread at 4 warps (16-byte loads)


def sum_slots(y, top_k: int):
    """``out [T, H]`` in y's dtype: ``out[t] = sum_j y[t*k + j]`` (kernel ``sum_slots``)."""
    import torch

    S, H = y.shape
    T = S // top_k
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    block_h = min(SUM_BLOCK_H, triton.next_power_of_2(H))
    grouped_swiglu_sum_slots_kernel[(T, triton.cdiv(H, block_h))](y, out, H, TOP_K=top_k, BLOCK_H=block_h,
                                                                  num_warps=4, num_stages=1)
    return out


def wgrad(a, b, routing_weights, sorted_slots, offsets, num_experts: int, a_div: int, b_div: int, config: dict):
    """``c [E, M, N]`` in a's dtype: ``c[e] = sum_{s in e} (rw[s] *) a[s // a_div]^T b[s // b_div]``.

    ``routing_weights`` (fp32, one per slot) scales A's rows when given, else no scaling."""
    import torch

    M, N = a.shape[1], b.shape[1]
    c = torch.empty((num_experts, M, N), dtype=a.dtype, device=a.device)
    # without scaling the kernel never reads rw_ptr; an fp32 dummy keeps the launched variant the compiled one
    rw = (routing_weights.reshape(-1).float().contiguous() if routing_weights is not None
          else torch.zeros(1, dtype=torch.float32, device=a.device))
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), num_experts)
    grouped_swiglu_wgrad_kernel[grid](
        a, b, rw, c, sorted_slots, offsets, M, N, A_DIV=a_div, B_DIV=b_div, SCALE_A=routing_weights is not None,
        PRECISION=_precision(a.dtype), **_launch_opts(config))
    return c


# ------------------------------------------------------------------------------------------ compile specs

# The model shapes (H, I, E) at which the heuristic's configs are compiled (top_k = 8 for both), and one slot
# count per branch of default_config. tests/test_grouped_swiglu.py sweeps default_config over slot counts and
# fails if it can return a config that is not compiled here: a new branch needs a phase.
MODEL_SHAPES = {"30B-A3B": (2048, 768, 128), "235B-A22B": (4096, 1536, 128)}
TOP_K = 8
_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_PHASES = (("decode", 8), ("mid", 8 * 64), ("prefill", 8 * 4096))  # T*k slots at k = 8
_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_IDX = {"padded_slots_ptr": "*i32", "block_expert_ptr": "*i32", "num_slots": "i32", "num_pid_m": "i32"}


def _p_max(slots: int, bm: int, experts: int) -> int:
    return (slots + experts * (bm - 1) + bm - 1) // bm * bm


def _variants(kernel: str, p: str, H: int, I: int, slots: int, num_pid_m: int, top_k: int, activations):
    """(variant, kernel name, fn, signature without tiles, constexprs, ints) of each compile of ``kernel``: gate_up
    with and without STORE_GU (inference skips it) and down_bwd for each of ``activations``, wgrad for dWd and
    dWgu (different M, N, divisors)."""
    rows = {"num_slots": slots, "num_pid_m": num_pid_m}
    if kernel == "gate_up":
        sig = {"x_ptr": p, "w_ptr": p, "h_ptr": p, "gu_ptr": p, **_IDX, "H": "i32", "I": "i32",
               "TOP_K": "constexpr", "STORE_GU": "constexpr", "ACTIVATION": "constexpr", "PRECISION": "constexpr"}
        for act in activations:
            for store_gu in (False, True):
                variant = ("" if act == "silu" else act) + ("+gu" if store_gu else "")
                yield (variant, "grouped_swiglu_gate_up_kernel", grouped_swiglu_gate_up_kernel, sig,
                       {"TOP_K": top_k, "STORE_GU": store_gu, "ACTIVATION": ACTIVATIONS.index(act)},
                       {**rows, "H": H, "I": I})
    elif kernel == "down":
        sig = {"h_ptr": p, "w_ptr": p, "rw_ptr": "*fp32", "y_ptr": p, **_IDX, "H": "i32", "I": "i32",
               "PRECISION": "constexpr"}
        yield "", "grouped_swiglu_down_kernel", grouped_swiglu_down_kernel, sig, {}, {**rows, "H": H, "I": I}
    elif kernel == "down_bwd":
        sig = {"dout_ptr": p, "w_ptr": p, "h_ptr": p, "gu_ptr": p, "rw_ptr": "*fp32", "dgu_ptr": p, "drw_ptr": "*fp32",
               **_IDX, "H": "i32", "I": "i32", "TOP_K": "constexpr", "ACTIVATION": "constexpr",
               "PRECISION": "constexpr"}
        for act in activations:
            yield ("" if act == "silu" else act, "grouped_swiglu_down_bwd_kernel", grouped_swiglu_down_bwd_kernel, sig,
                   {"TOP_K": top_k, "ACTIVATION": ACTIVATIONS.index(act)}, {**rows, "H": H, "I": I})
    elif kernel == "dx":
        sig = {"dgu_ptr": p, "w_ptr": p, "dxs_ptr": p, **_IDX, "H": "i32", "I2": "i32", "PRECISION": "constexpr"}
        yield "", "grouped_swiglu_dx_kernel", grouped_swiglu_dx_kernel, sig, {}, {**rows, "H": H, "I2": 2 * I}
    elif kernel == "wgrad":
        sig = {"a_ptr": p, "b_ptr": p, "rw_ptr": "*fp32", "c_ptr": p, "sorted_slots_ptr": "*i32", "offsets_ptr": "*i32",
               "M": "i32", "N": "i32", "A_DIV": "constexpr", "B_DIV": "constexpr", "SCALE_A": "constexpr",
               "PRECISION": "constexpr"}
        # dWd: A = dout [T, H] scaled by rw, B = h [T*k, I]; dWgu: A = dgu [T*k, 2I], B = x [T, H]
        for what, m, n, a_div, b_div, scale in (("dWd", H, I, top_k, 1, True), ("dWgu", 2 * I, H, 1, top_k, False)):
            yield (what, "grouped_swiglu_wgrad_kernel", grouped_swiglu_wgrad_kernel, sig,
                   {"A_DIV": a_div, "B_DIV": b_div, "SCALE_A": scale}, {"M": m, "N": n})
    else:
        raise ValueError(f"unknown kernel {kernel!r}")


def kernel_specs(kernel: str, dtype: str, H: int, I: int, E: int, slots: int, config: dict, label: str,
                 top_k: int = TOP_K, activations=ACTIVATIONS) -> list:
    """The CompileSpecs of one launch ``config`` of ``kernel`` in ``dtype`` at shape (H, I, E) and ``slots = T*k``,
    for each of ``activations`` where the kernel has one. ``extra`` records (kernel, dtype, H, I, E, variant, config)
    for the coverage tests."""
    cfg = _launch_opts(config)
    tiles = {k: cfg[k] for k in _TILES}
    num_pid_m = m_blocks(_p_max(slots, cfg["BLOCK_M"], E) // cfg["BLOCK_M"], slots, E, cfg["BLOCK_M"])
    prec = "tf32x3" if dtype == "fp32" else "tf32"
    specs = []
    for variant, name, fn, sig, constexprs, ints in _variants(kernel, _DT[dtype], H, I, slots, num_pid_m, top_k,
                                                              activations):
        specs.append(CompileSpec(
            kernel=name, fn=fn, signature={**sig, **dict.fromkeys(_TILES, "constexpr")},
            constexprs={**constexprs, "PRECISION": prec, **tiles},
            label=(f"{label}{' ' + variant if variant else ''} "
                   f"BM={cfg['BLOCK_M']} BN={cfg['BLOCK_N']} BK={cfg['BLOCK_K']}"),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], gemm=True, ints=ints,
            extra={"kernel": kernel, "dtype": dtype, "H": H, "I": I, "E": E, "variant": variant, "config": cfg}))
    return specs


def compile_specs() -> list[CompileSpec]:
    """The heuristic's configs at both model shapes for every phase and dtype, then every entry of every tuned
    table in ``configs/`` (skipping a compile that is already in the list: same kernel, dtypes, constexprs,
    warps, stages and divisibility). The activations other than SiLU are compiled at the first model's shape only:
    the two shapes' ints fall in the same JIT classes, so they launch the same variants (the coverage test checks
    every launch's variant is compiled)."""
    specs = []
    for m, (model, (H, I, E)) in enumerate(MODEL_SHAPES.items()):
        for phase, slots in _PHASES:
            for dt in _DT:
                for kernel in KERNELS:
                    specs += kernel_specs(kernel, dt, H, I, E, slots, default_config(slots, kernel, dt),
                                          f"{model} {phase} {dt}", activations=ACTIVATIONS if m == 0 else ("silu",))
    sums = []
    for model, (H, I, E) in MODEL_SHAPES.items():
        for dt, p in _DT.items():
            sums.append((CompileSpec(
                kernel="grouped_swiglu_sum_slots_kernel", fn=grouped_swiglu_sum_slots_kernel,
                signature={"y_ptr": p, "out_ptr": p, "H": "i32", "TOP_K": "constexpr", "BLOCK_H": "constexpr"},
                constexprs={"TOP_K": TOP_K, "BLOCK_H": min(SUM_BLOCK_H, triton.next_power_of_2(H))}, label="",
                num_warps=4, num_stages=1, ints={"H": H}, extra={"kernel": "sum_slots", "dtype": dt}),
                {"model": model, "dt": dt, "H": str(H)}))
    specs += one_per_variant(sums, "{model} {dt} H={H} k=8 (forward combine and dx, every T)")
    seen = {s.jit_variant() for s in specs}
    for path in shipped_tables():
        device = path.stem[len("grouped_swiglu_"):]
        for e in json.loads(path.read_text()).get("entries", []):
            H, I, E, slots = int(e["H"]), int(e["I"]), int(e["E"]), int(e["slots"])
            for spec in kernel_specs(e["kernel"], e["dtype"], H, I, E, slots, e["config"],
                                     f"tuned {device} H={H} I={I} E={E} slots={slots} {e['dtype']}",
                                     int(e.get("top_k", TOP_K))):
                variant = spec.jit_variant()
                if variant not in seen:
                    seen.add(variant)
                    specs.append(spec)
    return specs
