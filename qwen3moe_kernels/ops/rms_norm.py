"""``rms_norm`` and ``fused_add_rms_norm`` (``torch.ops.qwen3moe.*``, backward ``rms_norm_backward``).

RMSNorm over the last dim of ``x [..., H]`` as Hugging Face's Qwen3MoeRMSNorm computes it: fp32 sum of squares,
``normed = x * rsqrt(mean + eps)`` rounded to x's dtype, out = ``weight * normed`` in x's dtype; the fused op first
forms ``residual + x`` in x's dtype. Rows may be strided (last dim contiguous); outputs are contiguous.
Kernels: CPU and autograd ``csrc/rms_norm_cpu.cpp``; CUDA: the Triton kernels of ``kernels/rms_norm.py``,
registered below. Details: ``docs/ops/rms_norm.md``.
"""

from __future__ import annotations

import torch

from .. import _ext, reference
from ..recorder import fallback, record
from ._checks import FLOAT_DTYPES, check, check_device, check_dtype, check_like

def _check_shapes(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """What any RMSNorm needs (ValueError): x at least 1-D, weight ``[H]`` on x's device."""
    check(op, x.dim() >= 1, "x must have at least 1 dim")
    check(op, weight.dim() == 1 and weight.shape[0] == x.shape[-1],
          lambda: f"weight must have shape [{x.shape[-1]}] (x's last dim), got {list(weight.shape)}")
    check_device(op, "weight", weight, x.device)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """What the kernels take: the shapes, one fp32/fp16/bf16 dtype, eps > 0."""
    _check_shapes(op, x, weight, eps)
    check_dtype(op, "x", x)
    check_like(op, "weight", weight, x, "x")
    check(op, eps > 0, lambda: f"eps must be > 0, got {eps}")


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    check("fused_add_rms_norm", residual.shape == x.shape,
          lambda: f"residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    check_like("fused_add_rms_norm", "residual", residual, x, "x")


def _check_grad_out(grad_out: torch.Tensor, x: torch.Tensor) -> None:
    check("rms_norm_backward", grad_out.shape == x.shape, lambda: f"grad_out must have x's shape {list(x.shape)}, "
                                                                  f"got {list(grad_out.shape)}")
    check_like("rms_norm_backward", "grad_out", grad_out, x, "x")


def _empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, H]`` with a contiguous last dim: a view when the leading dims collapse, else a copy."""
    h = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(t.numel() // h if h else 0, h)


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        _check("rms_norm", x, weight, eps)
        return _empty(x)

    @torch.library.register_fake("qwen3moe::fused_add_rms_norm")
    def _fused_add_rms_norm_fake(x, residual, weight, eps):
        _check("fused_add_rms_norm", x, weight, eps)
        _check_residual(x, residual)
        return _empty(x), _empty(x)

    @torch.library.register_fake("qwen3moe::rms_norm_backward")
    def _rms_norm_backward_fake(grad_out, x, weight, eps):
        _check("rms_norm_backward", x, weight, eps)
        _check_grad_out(grad_out, x)
        return _empty(x), torch.empty_like(weight)

    # CUDA: the Triton kernels (imported on first use, so importing the package does not import triton). An empty
    # x (no rows, or H = 0) launches nothing, as on CPU (and out.view(-1, 0) would be ambiguous).
    def _rms_norm_cuda(x, weight, eps):
        from ..kernels import rms_norm as _k

        _check("rms_norm", x, weight, eps)
        out = _empty(x)
        if x.numel() == 0:
            return out
        _k.rms_norm_fwd(_as_rows(x), None, weight.contiguous(), eps, out.view(-1, x.shape[-1]), None)
        return out

    def _fused_add_rms_norm_cuda(x, residual, weight, eps):
        from ..kernels import rms_norm as _k

        _check("fused_add_rms_norm", x, weight, eps)
        _check_residual(x, residual)
        out, new_res = _empty(x), _empty(x)
        if x.numel() == 0:
            return out, new_res
        h = x.shape[-1]
        _k.rms_norm_fwd(_as_rows(x), _as_rows(residual), weight.contiguous(), eps, out.view(-1, h),
                        new_res.view(-1, h))
        return out, new_res

    def _rms_norm_backward_cuda(grad_out, x, weight, eps):
        from ..kernels import rms_norm as _k

        _check("rms_norm_backward", x, weight, eps)
        _check_grad_out(grad_out, x)
        dx = _empty(x)
        if x.numel() == 0:
            return dx, torch.zeros_like(weight)
        dw = torch.empty_like(weight)
        _k.rms_norm_bwd(_as_rows(grad_out).contiguous(), _as_rows(x), weight.contiguous(), eps,
                        dx.view(-1, x.shape[-1]), dw)
        return dx, dw

    torch.library.register_kernel("qwen3moe::rms_norm", "cuda", _rms_norm_cuda)
    torch.library.register_kernel("qwen3moe::fused_add_rms_norm", "cuda", _fused_add_rms_norm_cuda)
    torch.library.register_kernel("qwen3moe::rms_norm_backward", "cuda", _rms_norm_backward_cuda)


def _no_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> str | None:
    """Why no kernel takes these (valid) inputs, or None."""
    if _ext.kernel_impl(x.device, triton=True) is None:
        return _ext.no_kernel_reason(x.device, triton=True)
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        return (f"the kernels take one fp32/fp16/bf16 dtype, got x {x.dtype} and weight {weight.dtype} (cast the "
                f"model to one dtype to run them)")
    if not eps > 0:
        return f"the kernels take eps > 0, got {eps}"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim, ``[..., H]`` (differentiable)."""
    _check_shapes("rms_norm", x, weight, eps)
    reason = _no_kernel(x, weight, eps)
    if reason is not None:
        fallback("rms_norm", reason)
        return reference.rms_norm(x, weight, eps)
    record("rms_norm", _ext.kernel_impl(x.device, triton=True))
    return torch.ops.qwen3moe.rms_norm.default(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one pass (differentiable)."""
    _check_shapes("fused_add_rms_norm", x, weight, eps)
    check("fused_add_rms_norm", residual.shape == x.shape,
          lambda: f"residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    reason = _no_kernel(x, weight, eps) or (None if residual.dtype == x.dtype else
                                            f"residual is {residual.dtype}, x {x.dtype}")
    if reason is not None:
        fallback("fused_add_rms_norm", reason)
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    record("fused_add_rms_norm", _ext.kernel_impl(x.device, triton=True))
    return torch.ops.qwen3moe.fused_add_rms_norm.default(x, residual, weight, eps)


def rms_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of ``rms_norm`` at ``x`` (what autograd calls; exposed for tests/benchmarks)."""
    return torch.ops.qwen3moe.rms_norm_backward.default(grad_out, x, weight, eps)
