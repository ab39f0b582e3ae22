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

    record("sparse_moe_block", "triton" if x.is_cuda and not torch.is_grad_enabled() else x.device.type)
    return fused_moe(x, router_weight, w_gate_up, w_down, top_k, renormalize)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fallback("rms_norm", "no RMSNorm kernel yet")
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``."""
    fallback("fused_add_rms_norm", "no fused add+RMSNorm kernel yet")
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
    """Per-head RMSNorm of q and k, then RoPE."""
    fallback("qk_norm_rope", "no q/k-norm + RoPE kernel yet")
    return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
