"""Triton RMSNorm (and fused residual add + RMSNorm) over the last dim of ``[rows, H]``, forward and backward.

Rows may be strided (row stride an argument), the last dim contiguous; outputs contiguous. Forward: one program
per row. Backward: ``BWD_PROGRAMS`` programs (fixed, so the result does not depend on the device) write dx and
fp32 partial rows of dweight, which ``col_sum_kernel`` adds in order: deterministic, no atomics. Rounding and the
algorithm: ``docs/ops/rms_norm.md``.
"""

import torch
import triton
import triton.language as tl

from .spec import CompileSpec, one_per_variant


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr,  # [rows, H] input (row stride stride_x, last dim contiguous)
    res_ptr,  # [rows, H] residual (read when HAS_RESIDUAL)
    w_ptr,  # [H] weight
    out_ptr,  # [rows, H] normed output, contiguous
    new_res_ptr,  # [rows, H] residual + x, contiguous (written when HAS_RESIDUAL)
    stride_x,  # row stride of x in elements
    stride_r,  # row stride of residual in elements
    H,  # hidden size
    eps,  # variance epsilon (> 0)
    BLOCK_H: tl.constexpr,  # power of two >= H
    HAS_RESIDUAL: tl.constexpr,  # fused residual add
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # fp32 add rounded once equals the input-dtype add (fp32 has >= 2p+2 bits for fp16/bf16: no double
        # rounding), and keeps the interpreter away from bf16 arithmetic (it has no numpy bf16).
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # weight * normed in the input dtype: the exact fp32 product of two fp16/bf16 values rounded once is the
    # input-dtype product.
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr,  # [rows, H] gradient of the output, contiguous
    x_ptr,  # [rows, H] the normalised input (row stride stride_x, last dim contiguous)
    w_ptr,  # [H] weight
    dx_ptr,  # [rows, H] gradient of x, contiguous
    part_ptr,  # [programs, H] fp32 partial sums of dy * round(n) (this program's row)
    stride_x,  # row stride of x in elements
    rows,  # number of rows
    rows_per_prog,  # rows handled by each program
    H,  # hidden size
    eps,  # variance epsilon
    BLOCK_H: tl.constexpr,  # power of two >= H
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    count = tl.minimum(start + rows_per_prog, rows) - start
    for i in range(0, count):
        r64 = start + i  # int64 offsets: rows * H may pass 2^31
        x = tl.load(x_ptr + r64 * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
        n = xf * rstd
        dy = tl.load(dy_ptr + r64 * H + cols, mask=mask, other=0.0).to(tl.float32)
        dn = dy * w
        c = tl.sum(dn * n, axis=0) / H
        tl.store(dx_ptr + r64 * H + cols, (rstd * (dn - n * c)).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(part_ptr + pid.to(tl.int64) * H + cols, acc, mask=mask)


@triton.jit
def col_sum_kernel(
    part_ptr,  # [P, N] fp32 partials, contiguous
    out_ptr,  # [N] output (its dtype: the weight's)
    P,  # number of partial rows
    N,  # row length
    BLOCK_N: tl.constexpr,  # columns per program
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p in range(0, P):  # fixed order: deterministic
        acc += tl.load(part_ptr + p * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


BWD_PROGRAMS = 512  # fixed (not per device): the dweight summation order, and so its bits, never change
COL_SUM_BLOCK = 256


def col_sum(partials, out):
    """``out[:] = partials.sum(0)`` in a fixed order, rounded once to ``out.dtype``."""
    p, n = partials.shape
    if n == 0:
        return
    col_sum_kernel[(triton.cdiv(n, COL_SUM_BLOCK),)](partials, out, p, n, BLOCK_N=COL_SUM_BLOCK, num_warps=4,
                                                     num_stages=1)


def rms_norm_bwd(dy2d, x2d, weight, eps, dx, dw):
    """Backward over 2-D views: ``dy2d`` and ``dx`` contiguous ``[rows, H]``; fills ``dx`` and ``dw [H]``."""
    rows, h = x2d.shape
    if rows == 0:
        dw.zero_()
        return
    block_h = triton.next_power_of_2(h)
    progs = min(rows, BWD_PROGRAMS)
    per = triton.cdiv(rows, progs)
    progs = triton.cdiv(rows, per)
    part = torch.empty((progs, h), dtype=torch.float32, device=x2d.device)
    rms_norm_bwd_kernel[(progs,)](dy2d, x2d, weight, dx, part, x2d.stride(0), rows, per, h, eps,
                                  BLOCK_H=block_h, num_warps=_num_warps(block_h), num_stages=1)
    col_sum(part, dw)


def _num_warps(block_h: int) -> int:
    return 8 if block_h >= 4096 else 4 if block_h >= 1024 else 1


def rms_norm_fwd(x2d, residual2d, weight, eps, out, new_residual):
    """Launch over a 2-D view ``[rows, H]`` (last dim contiguous). ``residual2d``/``new_residual`` may be None."""
    rows, h = x2d.shape
    if rows == 0:
        return
    block_h = triton.next_power_of_2(h)
    has_res = residual2d is not None
    rms_norm_fwd_kernel[(rows,)](
        x2d,
        residual2d if has_res else x2d,
        weight,
        out,
        new_residual if has_res else out,
        x2d.stride(0),
        residual2d.stride(0) if has_res else 0,
        h,
        eps,
        BLOCK_H=block_h,
        HAS_RESIDUAL=has_res,
        num_warps=_num_warps(block_h),
        num_stages=1,  # what compile_specs() compiles (Triton's default would be 3)
    )


_MODELS = (("30B-A3B", 2048), ("235B-A22B", 4096))  # (model, hidden size)
_PHASES = (("decode", 1), ("decode", 8), ("prefill", 4096))  # (phase, rows) the backward specs cover


def _bwd_programs(rows: int) -> tuple[int, int]:
    """(programs, rows per program) of rms_norm_bwd's launch over ``rows`` rows."""
    per = triton.cdiv(rows, min(rows, BWD_PROGRAMS))
    return triton.cdiv(rows, per), per


def compile_specs() -> list[CompileSpec]:
    """Both models' hidden sizes x dtype, at decode (T = 1 and 8 rows) and prefill (4096 rows).

    The forward's launch does not depend on the row count (one program per row). The backward's does: ``rows``
    and ``rows_per_prog`` are 1 (constexprs) at T = 1, ``rows_per_prog`` is 1 up to 512 rows; and col_sum's ``P``
    (the backward's programs) is 1, 8 or 512. col_sum's ``N`` (the hidden size, or rope's head_dim 128) is a
    multiple of 16 at every shape, so one col_sum spec per (dtype, P) covers both models and rope's dqw/dkw sums.
    """
    specs = []
    for model, h in _MODELS:
        for dt in ("bf16", "fp16", "fp32"):
            for has_res in (False, True):
                block_h = triton.next_power_of_2(h)
                sig = {
                    "x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                    "new_res_ptr": f"*{dt}", "stride_x": "i64", "stride_r": "i64", "H": "i32", "eps": "fp32",
                    "BLOCK_H": "constexpr", "HAS_RESIDUAL": "constexpr",
                }
                specs.append(CompileSpec(
                    kernel="rms_norm_fwd_kernel", fn=rms_norm_fwd_kernel, signature=sig,
                    constexprs={"BLOCK_H": block_h, "HAS_RESIDUAL": has_res},
                    label=f"{model} hidden={h} {dt} residual={has_res} (decode and prefill: one program per row)",
                    num_warps=_num_warps(block_h), num_stages=1,
                    ints={"stride_x": h, "stride_r": h if has_res else 0, "H": h},
                ))
    col_sums = []
    for model, h in _MODELS:
        for dt in ("bf16", "fp16", "fp32"):
            block_h = triton.next_power_of_2(h)
            sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "part_ptr": "*fp32",
                   "stride_x": "i64", "rows": "i32", "rows_per_prog": "i32", "H": "i32", "eps": "fp32",
                   "BLOCK_H": "constexpr"}
            for phase, rows in _PHASES:
                progs, per = _bwd_programs(rows)
                specs.append(CompileSpec(
                    kernel="rms_norm_bwd_kernel", fn=rms_norm_bwd_kernel, signature=sig,
                    constexprs={"BLOCK_H": block_h}, label=f"{model} hidden={h} {dt} {phase} rows={rows}",
                    num_warps=_num_warps(block_h), num_stages=1,
                    ints={"stride_x": h, "rows": rows, "rows_per_prog": per, "H": h},
                ))
                col_sums.append((CompileSpec(
                    kernel="col_sum_kernel", fn=col_sum_kernel,
                    signature={"part_ptr": "*fp32", "out_ptr": f"*{dt}", "P": "i32", "N": "i32",
                               "BLOCK_N": "constexpr"},
                    constexprs={"BLOCK_N": COL_SUM_BLOCK}, label="", num_warps=4, num_stages=1,
                    ints={"P": progs, "N": h},
                ), {"dt": dt, "P": str(progs), "N": str(h), "phase": f"{phase} T={rows}"}))
    return specs + one_per_variant(col_sums, "{dt} P={P} partials N={N} (dweight, {phase})")
