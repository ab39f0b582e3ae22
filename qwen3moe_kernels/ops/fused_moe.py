"""``fused_moe``: the whole sparse MoE block (router linear, top-k routing, SwiGLU experts, weighted combine), and
``moe_experts``: the experts part alone, given the routing.

    logits = x @ router_weight.T                       [T, E]
    weights, ids = router_topk(logits, top_k, renormalize)
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))   with e = ids[t, j]

``moe_experts(x, ids, weights, w_gate_up, w_down)`` computes the last line with the registered op
``qwen3moe::grouped_swiglu`` of ``ops/grouped_swiglu.py`` (the gate/up GEMM, then the down GEMM and the combine,
over one grouping of the slots): on CUDA the Triton kernels (x gathered inside the gate/up GEMM, the routing
weight applied in the down GEMM's epilogue to the fp32 accumulator, each slot's row stored in x's dtype, the k
slots of a token summed in a fixed order in fp32: deterministic); on CPU one torch matrix product per expert
over its rows (one ``torch._grouped_mm`` for all of them where it applies). As in ``reference.moe_experts`` (and
transformers), the routing weights are rounded to x's dtype before use (inside the ops; with a gradient also in
autograd, so the weights' gradient is that of the rounding).

Autograd: ``moe_experts`` is differentiable in x, weights, w_gate_up and w_down. With a gradient needed the
forward also keeps h and the gate/up pre-activations; the backward runs ``qwen3moe::grouped_swiglu_backward``
(what ``grouped_swiglu_down_backward`` then ``grouped_swiglu_gate_up_backward`` compute: dgate/dup with the
SwiGLU backward fused in, d_w_down, d_weights, then dx, d_w_gate_up; one grouping of the slots for all of it),
computing only the gradients autograd asks for: Triton kernels on CUDA, torch on CPU.
``fused_moe`` routes with the ``router_topk`` op, or with the differentiable reference routing when a gradient is
needed (the op has no autograd for the weights).

Layout: x [T, H]; router_weight [E, H]; w_gate_up [E, 2I, H] (gate rows first); w_down [E, H, I];
ids [T, k] int32/int64; weights [T, k] (any float dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch, reference
from . import grouped_swiglu as _gs  # noqa: F401  (registers the qwen3moe::grouped_swiglu_* ops)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, router_weight, w_gate_up, w_down, top_k):
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"fused_moe: x must be fp32/fp16/bf16, got {x.dtype}")
    T, H = x.shape
    for name, t in (("router_weight", router_weight), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"fused_moe: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"fused_moe: {name} is on {t.device}, x on {x.device}")
    if router_weight.dim() != 2 or router_weight.shape[1] != H:
        raise ValueError(f"fused_moe: router_weight must be [E, {H}], got {tuple(router_weight.shape)}")
    E = router_weight.shape[0]
    if w_gate_up.dim() != 3 or w_gate_up.shape[0] != E or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"fused_moe: w_gate_up must be [{E}, 2I, {H}], got {tuple(w_gate_up.shape)}")
    I = w_gate_up.shape[1] // 2
    if w_down.dim() != 3 or tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"fused_moe: w_down must be [{E}, {H}, {I}], got {tuple(w_down.shape)}")
    if not (1 <= top_k <= E):
        raise ValueError(f"fused_moe: top_k must be in [1, E={E}], got {top_k}")
    return T, H, E, I


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 stays bf16 where the CPU has native bf16 dot products (fast bf16 GEMM), else fp32."""
    from ..cpu import native_bf16

    if dtype == torch.bfloat16 and not native_bf16():
        return torch.float32
    return dtype


def _check_experts(x, ids, weights, w_gate_up, w_down):
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"moe_experts: x must be fp32/fp16/bf16, got {x.dtype}")
    T, H = x.shape
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"moe_experts: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"moe_experts: {name} is on {t.device}, x on {x.device}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2 or w_gate_up.shape[1] == 0:
        raise ValueError(f"moe_experts: w_gate_up must be [E, 2I, {H}], got {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if w_down.dim() != 3 or tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"moe_experts: w_down must be [{E}, {H}, {I}], got {tuple(w_down.shape)}")
    if ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"moe_experts: ids must be [T={T}, top_k], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_experts: ids must be int32 or int64, got {ids.dtype}")
    if not weights.is_floating_point() or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"moe_experts: weights must be a float [T, top_k] = {tuple(ids.shape)} tensor, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    for name, t in (("ids", ids), ("weights", weights)):
        if t.device != x.device:
            raise ValueError(f"moe_experts: {name} is on {t.device}, x on {x.device}")
    if not (1 <= ids.shape[1] <= E):
        raise ValueError(f"moe_experts: top_k (ids.shape[1]) must be in [1, E={E}], got {ids.shape[1]}")
    return T, H, E, I


class _MoeExperts(torch.autograd.Function):
    """The registered forward ops, keeping what the registered backward ops need."""

    @staticmethod
    def forward(ctx, x, ids, weights, w_gate_up, w_down):
        out, h, gu = torch.ops.qwen3moe.grouped_swiglu(x, w_gate_up, w_down, ids, weights, True)
        ctx.save_for_backward(x, ids, weights, w_gate_up, w_down, h, gu)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, ids, weights, w_gate_up, w_down, h, gu = ctx.saved_tensors
        need_x, _, need_rw, need_wgu, need_wd = ctx.needs_input_grad
        # frozen experts: their weight gradients (a third of the backward's GEMM work) are skipped
        dx, dwgu, dwd, drw = torch.ops.qwen3moe.grouped_swiglu_backward(
            dout.contiguous(), x, h, gu, w_gate_up, w_down, ids, weights, need_x, need_wgu, need_wd)
        return (dx if need_x else None, None, drw if need_rw else None, dwgu if need_wgu else None,
                dwd if need_wd else None)


def moe_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The routed SwiGLU experts, ``[T, H]`` in x's dtype: ``out[t] = sum_j weights[t, j] * expert_e(x[t])``,
    ``e = ids[t, j]`` (``reference.moe_experts``'s semantics). Differentiable in x, weights, w_gate_up, w_down.

    x [T, H] fp32/fp16/bf16; ids [T, k] int32/int64 in [0, E); weights [T, k] float (rounded to x's dtype
    first, as transformers does); w_gate_up [E, 2I, H]; w_down [E, H, I], both in x's dtype, on x's device.
    """
    T, H, E, I = _check_experts(x, ids, weights, w_gate_up, w_down)
    if not torch.compiler.is_compiling():
        dispatch.record("moe_experts", "triton" if x.device.type == "cuda" else x.device.type)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate_up, w_down)):
        # the rounding in autograd too: the weights' gradient is the rounding's (as in the reference)
        return _MoeExperts.apply(x, ids, weights.to(x.dtype).float(), w_gate_up, w_down)
    # no gradient: the op rounds the fp32 router weights itself (in the down kernel on CUDA: no cast launches)
    weights = weights if weights.dtype == torch.float32 else weights.float()  # exact from fp16/bf16
    return torch.ops.qwen3moe.grouped_swiglu(x, w_gate_up, w_down, ids, weights, False)[0]


def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse MoE block for ``x [T, H]``: returns ``(out [T, H], router_logits [T, E])``."""
    T, H, E, I = _check(x, router_weight, w_gate_up, w_down, top_k)
    logits = F.linear(x, router_weight)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, router_weight, w_gate_up, w_down)
    )
    if needs_grad:
        # router_topk's op has no autograd for the weights; the reference routing is differentiable.
        weights, ids = reference.router_topk(logits, top_k, renormalize)
    else:
        from .router_topk import router_topk

        weights, ids = router_topk(logits, top_k, renormalize)
    if not torch.compiler.is_compiling():
        dispatch.record("fused_moe", "triton" if x.device.type == "cuda" else x.device.type)
    return moe_experts(x, ids, weights, w_gate_up, w_down), logits
