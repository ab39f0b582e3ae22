"""The fused backend's entry points: the model-level steps the thin model (and the transformers drop-in) call.

Each function computes exactly what the reference function of the same name computes, with our kernels
where one fits the inputs; otherwise it runs the reference and reports the fallback once
(``qwen3moe_kernels.dispatch``). ``qwen3moe_kernels.implementations()`` tells which path each op took.

Layouts are the reference's (see ``qwen3moe_kernels.reference``): ``x [T, H]`` for the MoE block,
``[..., H]`` for norms, ``q [B, S, Hq, D]`` / ``k [B, S, Hk, D]`` with ``cos, sin [B, S, D]`` for RoPE.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import fallback


def sparse_moe_block(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router + experts of one sparse MoE layer for ``x [T, H]``. Returns ``(out [T, H], router_logits [T, E])``."""
    fits = (
        x.dim() == 2
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.dtype == x.dtype and t.device == x.device for t in (router_weight, w_gate_up, w_down))
        and x.device.type in ("cpu", "cuda")
    )
    if not fits:
        fallback("sparse_moe_block", f"fused_moe needs fp32/fp16/bf16 on CPU/CUDA, got {x.dtype} on {x.device}")
        return reference.sparse_moe_block(x, router_weight, w_gate_up, w_down, top_k, renormalize)
    from .dispatch import record
    from .ops.fused_moe import fused_moe

    if not torch.compiler.is_compiling():
        # the experts run the Triton kernels on CUDA forward and backward (ops/fused_moe.moe_experts)
        record("sparse_moe_block", "triton" if x.is_cuda else x.device.type)
    return fused_moe(x, router_weight, w_gate_up, w_down, top_k, renormalize)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _norm_fits(x, weight, eps):
        from .ops.rms_norm import rms_norm as _op

        return _op(x, weight, eps)
    fallback("rms_norm", f"no RMSNorm kernel for x {x.dtype} / weight {weight.dtype} {tuple(weight.shape)}")
    return reference.rms_norm(x, weight, eps)


def _norm_fits(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """The qwen3moe RMSNorm ops take fp32/fp16/bf16 x with a same-dtype [H] weight on the same device."""
    return (
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
        and weight.device == x.device
        and eps > 0
    )


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``."""
    if _norm_fits(x, weight, eps) and residual.shape == x.shape and residual.dtype == x.dtype:
        from .ops.rms_norm import fused_add_rms_norm as _op

        return _op(x, residual, weight, eps)
    fallback("fused_add_rms_norm", "inputs outside the fused add+RMSNorm kernel (dtype/shape)")
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE: one pass of ``qwen3moe::qk_norm_rope`` when the inputs fit."""
    fits = (
        q.dim() == 4
        and k.dim() == 4
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and q.device.type in ("cpu", "cuda")
        and all(t.dtype == q.dtype and t.device == q.device for t in (k, q_weight, k_weight, cos, sin))
        and q.shape[-1] % 2 == 0
        and k.shape[:2] == q.shape[:2]
        and k.shape[-1] == q.shape[-1]
        and q_weight.shape == k_weight.shape == (q.shape[-1],)
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1:] == q.shape[1:2] + q.shape[3:]
        and eps > 0
    )
    if fits:
        from .ops.rope import qk_norm_rope as _op

        return _op(q, k, q_weight, k_weight, cos, sin, eps)
    fallback("qk_norm_rope", f"no q/k-norm + RoPE kernel for q {q.dtype} on {q.device.type} with cos {cos.dtype} "
                             "(needs q/k [B, S, H, D], D even, same-dtype [D] weights and [B or 1, S, D] cos/sin)")
    return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
