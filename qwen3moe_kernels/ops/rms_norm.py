"""Public ops ``qwen3moe::rms_norm``, ``qwen3moe::fused_add_rms_norm`` (and their ``rms_norm_backward``).

RMSNorm over the last dim of ``x [..., H]``: fp32 sum of squares, ``normed = x * rsqrt(mean + eps)`` rounded
to the input dtype, output ``weight * normed`` in the input dtype (Hugging Face's Qwen3MoeRMSNorm).
``fused_add_rms_norm`` first forms ``new_residual = residual + x`` in the input dtype and returns
``(rms_norm(new_residual), new_residual)``. Rows may be strided; the last dim must be contiguous (otherwise a
contiguous copy is made). Outputs are contiguous.

Where each piece lives:

* schemas: ``csrc/ops.cpp`` (C++ ``TORCH_LIBRARY``), so a call costs one dispatcher hop and no Python;
* CPU kernels and the autograd kernels: ``csrc/rms_norm_cpu.cpp`` (one pass per row, at::parallel_for; the
  backward calls ``qwen3moe::rms_norm_backward`` through the dispatcher; that op is not differentiable, so double
  backward, ``create_graph=True`` then differentiating the gradients, raises);
* CUDA kernels: the Triton kernels of ``kernels/rms_norm.py``, registered below for the CUDA key (forward,
  and a backward with a deterministic two-stage dweight reduction);
* fake (meta) implementations: below.

Without the compiled extension the functions here run the reference (``dispatch.fallback`` says so).
"""

from __future__ import annotations

import importlib.util

import torch

from .. import _ext, dispatch, reference

__all__ = ["rms_norm", "fused_add_rms_norm", "rms_norm_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, op: str = "rms_norm") -> None:
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dim")
    torch._check(x.dtype in _DTYPES, lambda: f"{op}: x dtype must be float32/float16/bfloat16, got {x.dtype}")
    torch._check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: f"{op}: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}",
    )
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight dtype {weight.dtype} != x dtype {x.dtype}")
    torch._check(weight.device == x.device, lambda: f"{op}: weight must be on the device of x")
    torch._check(eps > 0, lambda: f"{op}: eps must be > 0, got {eps}")


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    torch._check(residual.shape == x.shape,
                 lambda: f"fused_add_rms_norm: residual shape {list(residual.shape)} != x shape {list(x.shape)}")
    torch._check(residual.dtype == x.dtype,
                 lambda: f"fused_add_rms_norm: residual dtype {residual.dtype} != x dtype {x.dtype}")
    torch._check(residual.device == x.device, lambda: "fused_add_rms_norm: residual must be on the device of x")


def _check_grad_out(grad_out: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(grad_out.shape == x.shape and grad_out.dtype == x.dtype,
                 lambda: f"rms_norm_backward: grad_out must match x in shape and dtype, got {list(grad_out.shape)} "
                         f"{grad_out.dtype}")


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
        _check(x, weight, eps)
        return _empty(x)

    @torch.library.register_fake("qwen3moe::fused_add_rms_norm")
    def _fused_add_rms_norm_fake(x, residual, weight, eps):
        _check(x, weight, eps, "fused_add_rms_norm")
        _check_residual(x, residual)
        return _empty(x), _empty(x)

    @torch.library.register_fake("qwen3moe::rms_norm_backward")
    def _rms_norm_backward_fake(grad_out, x, weight, eps):
        _check(x, weight, eps, "rms_norm_backward")
        _check_grad_out(grad_out, x)
        return _empty(x), torch.empty_like(weight)

    # CUDA: the Triton kernels (imported on first use, so importing this module does not import triton). An empty
    # x (no rows, or H = 0) launches nothing, as on CPU (and out.view(-1, 0) would be ambiguous).
    def _rms_norm_cuda(x, weight, eps):
        from ..kernels import rms_norm as _k

        _check(x, weight, eps)
        out = _empty(x)
        if x.numel() == 0:
            return out
        _k.rms_norm_fwd(_as_rows(x), None, weight.contiguous(), eps, out.view(-1, x.shape[-1]), None)
        return out

    def _fused_add_rms_norm_cuda(x, residual, weight, eps):
        from ..kernels import rms_norm as _k

        _check(x, weight, eps, "fused_add_rms_norm")
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

        _check(x, weight, eps, "rms_norm_backward")
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


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _impl(t: torch.Tensor) -> str | None:
    if not _ext.AVAILABLE:
        return None
    return {"cpu": "cpu", "cuda": "triton" if _HAS_TRITON else None}.get(t.device.type)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim (autograd supported)."""
    impl = _impl(x)
    if impl is None:
        dispatch.fallback("rms_norm", _ext.no_kernel_reason(x.device))
        return reference.rms_norm(x, weight, eps)
    if not torch.compiler.is_compiling():
        dispatch.record("rms_norm", impl)
    return torch.ops.qwen3moe.rms_norm.default(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one pass (autograd supported)."""
    impl = _impl(x)
    if impl is None:
        dispatch.fallback("fused_add_rms_norm", _ext.no_kernel_reason(x.device))
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    if not torch.compiler.is_compiling():
        dispatch.record("fused_add_rms_norm", impl)
    return torch.ops.qwen3moe.fused_add_rms_norm.default(x, residual, weight, eps)


def rms_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of ``rms_norm`` at ``x`` (what autograd calls; exposed for tests/benchmarks)."""
    return torch.ops.qwen3moe.rms_norm_backward.default(grad_out, x, weight, eps)
