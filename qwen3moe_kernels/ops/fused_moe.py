"""``fused_moe``: the whole sparse MoE block of Qwen3-MoE, router to combine.

    logits = x @ router_weight.T                                  [T, E]
    weights, ids = router_topk(logits, top_k, renormalize)        [T, k] fp32, [T, k] int32
    out = moe_experts(x, w_gate_up, w_down, ids, weights)         [T, H]

Layout: x [T, H]; router_weight [E, H]; w_gate_up [E, 2I, H] (gate rows first); w_down [E, H, I]. Differentiable in
x and all three weights: with a gradient the routing runs ``reference.router_topk`` (the ``router_topk`` op has no
backward). Returns ``(out [T, H], router_logits [T, E])``, as ``reference.fused_moe``.

``ep_group=group`` (a ``torch.distributed`` group): expert parallelism, ``qwen3moe_kernels.parallel.fused_moe``;
x is then this rank's tokens and w_gate_up/w_down this rank's shard ``[E/world, ...]`` (``docs/parallel.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext, reference
from ..recorder import fallback, record
from ._checks import FLOAT_DTYPES, check, check_like
from .grouped_swiglu import cpu_experts_impl, moe_experts
from .router_topk import router_topk


def _check(x, router_weight, w_gate_up, w_down, top_k):
    op = "fused_moe"
    check(op, x.dim() == 2, lambda: f"x must be [T, H], got shape {list(x.shape)}")
    H = x.shape[1]
    check(op, router_weight.dim() == 2 and router_weight.shape[1] == H,
          lambda: f"router_weight must be [E, {H}], got {list(router_weight.shape)}")
    E = router_weight.shape[0]
    check(op, w_gate_up.dim() == 3 and w_gate_up.shape[0] == E and w_gate_up.shape[2] == H
          and w_gate_up.shape[1] % 2 == 0, lambda: f"w_gate_up must be [{E}, 2I, {H}], got {list(w_gate_up.shape)}")
    I = w_gate_up.shape[1] // 2
    check(op, tuple(w_down.shape) == (E, H, I), lambda: f"w_down must be [{E}, {H}, {I}], got {list(w_down.shape)}")
    check(op, 1 <= top_k <= E, lambda: f"top_k must be in [1, E={E}], got {top_k}")
    for name, t in (("router_weight", router_weight), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_like(op, name, t, x, "x")  # a mixed-dtype matmul is an error in torch (and transformers) too


def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    activation="silu",
    *,
    ep_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse MoE block for ``x [T, H]``: ``(out [T, H], router_logits [T, E])``, every weight in x's dtype.
    The kernels take fp32/fp16/bf16 on CPU or CUDA; other float dtypes or devices run the reference, visibly.
    ``activation``: the experts' gate activation, as ``moe_experts`` takes it ("silu" for Qwen3). With
    ``ep_group`` the experts are sharded over that group: w_gate_up ``[E/world, 2I, H]`` and w_down ``[E/world, H, I]``
    are this rank's experts ``[r*E/world, (r+1)*E/world)``, router_weight the full ``[E, H]``; every rank of the
    group calls it with its own tokens (the arguments are checked on every rank, together)."""
    if ep_group is not None:
        from ..parallel import moe as _ep  # imported on first use: torch.distributed only where EP is asked for

        return _ep.fused_moe(x, router_weight, w_gate_up, w_down, top_k, renormalize, ep_group, activation)
    _check(x, router_weight, w_gate_up, w_down, top_k)
    if x.dtype not in FLOAT_DTYPES or x.device.type not in ("cpu", "cuda"):
        fallback("fused_moe", f"the kernels take fp32/fp16/bf16 on CPU/CUDA, got {x.dtype} on {x.device}")
        return reference.fused_moe(x, router_weight, w_gate_up, w_down, top_k, renormalize, activation)
    if not torch.compiler.is_compiling():  # the CPU experts' path is a read of the C++ extension: eager only
        record("fused_moe", "triton" if x.is_cuda and _ext.HAS_TRITON else cpu_experts_impl() if x.device.type == "cpu"
               else x.device.type)
    logits = F.linear(x, router_weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, router_weight, w_gate_up, w_down)):
        weights, ids = reference.router_topk(logits, top_k, renormalize)  # differentiable in the logits
    else:
        weights, ids = router_topk(logits, top_k, renormalize)
    return moe_experts(x, w_gate_up, w_down, ids, weights, activation), logits
