"""``fused_moe``: the whole sparse MoE block (router linear, top-k routing, SwiGLU experts, weighted combine).

    logits = x @ router_weight.T                       [T, E]
    weights, ids = router_topk(logits, top_k, renormalize)
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))   with e = ids[t, j]

Implementations:
- CUDA (no gradient needed): ``moe_align_block`` then the two Triton grouped GEMMs of
  ``kernels/grouped_swiglu.py`` (x gathered inside kernel 1, routing weight applied in kernel 2's epilogue);
  the k slots of each token are summed in a fixed order in fp32 (deterministic).
- CPU, and any device when a gradient is needed: the slots are sorted by expert (``moe_sort``), the rows of x
  gathered once, one matrix product per expert over its contiguous rows, and the weighted fp32 combine. The
  compute dtype is the model dtype, except bf16 on CPUs without AVX-512 (AVX2-only: bf16 matmul is very slow
  there), where the experts run in fp32. Backward goes through autograd of these torch ops.
Layout: x [T, H]; router_weight [E, H]; w_gate_up [E, 2I, H] (gate rows first); w_down [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch, reference

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


def _experts_torch(x, weights, ids, w_gate_up, w_down, E, top_k):
    """Per-expert matrix products over the expert-sorted rows; fp32 combine over the k slots."""
    T, H = x.shape
    cdt = cpu_compute_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x[order // top_k].to(cdt)
    ys = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = xs[start : start + c]
        h = reference.swiglu(F.linear(rows, w_gate_up[e].to(cdt)))
        ys.append(F.linear(h, w_down[e].to(cdt)))
        start += c
    y_sorted = torch.cat(ys, 0) if ys else xs.new_zeros((0, H))
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted) if ys else y_sorted  # back to slot order
    y = y.float().reshape(T, top_k, H) * weights.float()[:, :, None]
    return y.sum(1).to(x.dtype)


def _experts_triton(x, weights, ids, w_gate_up, w_down, E, top_k):
    from ..kernels import grouped_swiglu as k
    from . import moe_permute as mp

    T, H = x.shape
    cfg = k.default_config(T * top_k)
    padded, block_expert, _ = mp.moe_align_block(ids, E, cfg["BLOCK_M"])
    h = k.gate_up(x.contiguous(), w_gate_up.contiguous(), padded, block_expert, top_k, cfg)
    y = k.down(h, w_down.contiguous(), weights, padded, block_expert, cfg)
    return y.reshape(T, top_k, H).sum(1).to(x.dtype)


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
    if T == 0:
        return x.new_zeros((0, H)), logits
    if x.is_cuda and not needs_grad:
        dispatch.record("fused_moe", "triton")
        return _experts_triton(x, weights, ids, w_gate_up, w_down, E, top_k), logits
    dispatch.record("fused_moe", "cpu" if x.device.type == "cpu" else "torch")
    return _experts_torch(x, weights, ids, w_gate_up, w_down, E, top_k), logits
