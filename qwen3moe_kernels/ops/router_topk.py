"""``router_topk``: the MoE router's selection step (``torch.ops.qwen3moe.router_topk``).

logits ``[T, E]`` (fp32/bf16/fp16, E <= 512) -> ``(weights fp32 [T, k], ids int32 [T, k])``: fp32 softmax, the top-k
by descending probability (ties: lowest expert id; NaN counts as largest), optionally renormalised to sum 1.
Kernels: ``csrc/router_topk_cpu.cpp``, ``csrc/router_topk.cu`` (shared row code in ``csrc/router_topk.h``); the
algorithm is in ``docs/ops/router_topk.md``.
"""

from __future__ import annotations

import torch

from .. import _ext, reference
from ..recorder import fallback, record
from ._checks import FLOAT_DTYPES, check, check_dtype

MAX_EXPERTS = 512


def _check_shape(logits: torch.Tensor, top_k: int) -> None:
    check("router_topk", logits.dim() == 2, lambda: f"logits must be 2-D [T, E], got shape {list(logits.shape)}")
    E = logits.shape[1]
    check("router_topk", 1 <= top_k <= E, lambda: f"top_k must be in [1, E={E}], got {top_k}")


def _check(logits: torch.Tensor, top_k: int) -> None:
    _check_shape(logits, top_k)
    check_dtype("router_topk", "logits", logits)
    E = logits.shape[1]
    check("router_topk", E <= MAX_EXPERTS, lambda: f"logits.size(1) = E must be <= {MAX_EXPERTS}, got {E}")


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::router_topk")
    def _router_topk_fake(logits, top_k, renormalize):
        _check(logits, top_k)
        T = logits.shape[0]
        return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32)

    @torch.library.register_fake("qwen3moe::router_topk.out")
    def _router_topk_out_fake(logits, top_k, renormalize, *, weights, ids):
        _check(logits, top_k)


def _no_kernel(logits: torch.Tensor) -> str | None:
    """Why no kernel takes these (valid) logits, or None."""
    if _ext.kernel_impl(logits.device) is None:
        return _ext.no_kernel_reason(logits.device)
    if logits.dtype not in FLOAT_DTYPES:
        return f"no kernel for {logits.dtype} logits"
    if logits.shape[1] > MAX_EXPERTS:
        return f"the kernel takes at most {MAX_EXPERTS} experts, got {logits.shape[1]}"
    return None


def router_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T, k], ids int32 [T, k])`` of router ``logits [T, E]``: fp32 softmax, top-k (ties: lowest
    id), optionally renormalised. ``out=(weights, ids)`` writes into preallocated buffers (decode, CUDA graphs).
    Not differentiable: with a gradient, route with ``reference.router_topk`` (``fused_moe`` does)."""
    _check_shape(logits, top_k)
    reason = _no_kernel(logits)
    if reason is not None:
        fallback("router_topk", reason)
        w, i = reference.router_topk(logits, top_k, renormalize)
        if out is None:
            return w, i
        out[0].copy_(w), out[1].copy_(i)
        return out
    record("router_topk", _ext.kernel_impl(logits.device))
    if out is None:
        return torch.ops.qwen3moe.router_topk(logits, top_k, renormalize)
    torch.ops.qwen3moe.router_topk.out(logits, top_k, renormalize, weights=out[0], ids=out[1])
    return out
