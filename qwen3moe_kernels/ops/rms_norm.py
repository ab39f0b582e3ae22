"""Public ops ``qwen3moe::rms_norm`` and ``qwen3moe::fused_add_rms_norm``.

RMSNorm over the last dim of ``x [..., H]``: fp32 sum of squares, ``normed = x * rsqrt(mean + eps)`` rounded
to the input dtype, output ``weight * normed`` in the input dtype (Hugging Face's Qwen3MoeRMSNorm).
``fused_add_rms_norm`` first forms ``new_residual = residual + x`` in the input dtype and returns
``(rms_norm(new_residual), new_residual)``.

Implementations: CUDA tensors run the Triton kernel in ``kernels/rms_norm.py`` (rows may be strided, the
last dim must be contiguous, otherwise a contiguous copy is made); CPU tensors run plain torch in fp32
with exactly the reference's rounding. Backward (both devices) is fp32 torch math:
``dn = dy * w``, ``dx = rstd * (dn - n * mean(dn * n))``, ``dw = sum_rows(dy * n_rounded)``.
"""

import torch

from .. import dispatch

__all__ = ["rms_norm", "fused_add_rms_norm"]


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, name: str = "x") -> None:
    torch._check(x.dim() >= 1, lambda: f"rms_norm: {name} must have at least 1 dim")
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"rms_norm: {name} dtype must be float32/float16/bfloat16, got {x.dtype}",
    )
    torch._check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: f"rms_norm: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}",
    )
    torch._check(weight.dtype == x.dtype, lambda: f"rms_norm: weight dtype {weight.dtype} != {name} dtype {x.dtype}")
    torch._check(weight.device == x.device, lambda: "rms_norm: weight must be on the same device as x")
    torch._check(eps > 0, lambda: f"rms_norm: eps must be > 0, got {eps}")


def _cpu_forward(x, weight, eps):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, h)  # a view when the leading dims collapse, else a copy
    return t2


@torch.library.custom_op("qwen3moe::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, weight, eps)
    if x.device.type == "cuda":
        from ..kernels.rms_norm import rms_norm_fwd

        dispatch.record("rms_norm", "triton")
        x2 = _as_rows(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rms_norm_fwd(x2, None, weight.contiguous(), eps, out.view(-1, x.shape[-1]), None)
        return out
    dispatch.record("rms_norm", "cpu")
    return _cpu_forward(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qwen3moe::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, eps)
    torch._check(residual.shape == x.shape, lambda: f"fused_add_rms_norm: residual shape {list(residual.shape)} != x shape {list(x.shape)}")
    torch._check(residual.dtype == x.dtype, lambda: f"fused_add_rms_norm: residual dtype {residual.dtype} != x dtype {x.dtype}")
    if x.device.type == "cuda":
        from ..kernels.rms_norm import rms_norm_fwd

        dispatch.record("fused_add_rms_norm", "triton")
        h = x.shape[-1]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rms_norm_fwd(_as_rows(x), _as_rows(residual), weight.contiguous(), eps, out.view(-1, h), new_res.view(-1, h))
        return out, new_res
    dispatch.record("fused_add_rms_norm", "cpu")
    new_res = residual + x
    return _cpu_forward(new_res, weight, eps), new_res


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _check(x, weight, eps)
    torch._check(residual.shape == x.shape, lambda: "fused_add_rms_norm: residual shape must equal x shape")
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_math(x, weight, eps, dy):
    """fp32 gradients of ``weight * (x * rstd).to(dtype)`` w.r.t. x and weight."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    dyf = dy.float()
    dn = dyf * weight.float()
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dyf * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _setup_rms(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _bwd_rms(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = _backward_math(x, weight, ctx.eps, grad)
    return dx, dw, None


rms_norm.register_autograd(_bwd_rms, setup_context=_setup_rms)


def _setup_add(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _bwd_add(ctx, grad_out, grad_res):
    new_res, weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(new_res)
    dx, dw = _backward_math(new_res, weight, ctx.eps, grad_out)
    if grad_res is not None:
        dx = dx + grad_res
    return dx, dx, dw, None


fused_add_rms_norm.register_autograd(_bwd_add, setup_context=_setup_add)
