"""Triton RMSNorm (and fused residual add + RMSNorm) forward over the last dim of ``[rows, H]``.

Algorithm: one program per row; the whole row (padded to BLOCK_H, a power of two >= H, masked) is loaded,
sum of squares accumulated in fp32, ``normed = x * rsqrt(mean + eps)`` rounded to the input dtype, then
multiplied by ``weight`` in the input dtype, exactly as Hugging Face's Qwen3MoeRMSNorm computes it.
Layout: x/residual/out rows may be strided (row stride given), the last dim must be contiguous.
"""

import triton
import triton.language as tl

from .spec import CompileSpec


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
    )


def compile_specs() -> list[CompileSpec]:
    specs = []
    for model, h in (("30B-A3B", 2048), ("235B-A22B", 4096)):
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
    return specs
