"""The sparse MoE block under expert parallelism: ``fused_moe`` with this rank's tokens and this rank's expert shard,
and ``ExpertParallelMoE``, a module holding them.

x [T, H] this rank's tokens (T may differ by rank, 0 included); router_weight [E, H] the full router, the same on
every rank; w_gate_up [E/world, 2I, H] and w_down [E/world, H, I] this rank's contiguous shard, experts
``[r*E/world, (r+1)*E/world)`` (:func:`expert_range`, :func:`shard_experts`). Route locally, dispatch, run the local
experts with ``torch.ops.qwen3moe.grouped_swiglu`` on the rows received, combine: the same arithmetic as
single-process ``ops.fused_moe`` on the same tokens, row for row. Design and rounding: ``docs/parallel.md``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..ops._checks import FLOAT_DTYPES
from ..ops.router_topk import router_topk
from ..recorder import fallback, record
from . import checks
from .comm import rank_world
from ..ops.moe_permute import sum_slots
from .dispatch import _Combine, _Dispatch, permute_tokens, plan


def expert_range(num_experts: int, group) -> tuple[int, int]:
    """``(first, end)``: the global ids of the experts this rank of ``group`` owns, ``[r*E/world, (r+1)*E/world)``."""
    rank, world = rank_world(group)
    if num_experts < 1 or num_experts % world:
        raise ValueError(f"{num_experts} experts cannot be shared evenly by the {world} ranks of ep_group "
                         f"(E % world = {num_experts % world}): expert parallelism needs E % world == 0")
    n = num_experts // world
    return rank * n, (rank + 1) * n


def shard_experts(w: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice ``w[first:end]`` of a stacked expert weight ``w [E, ...]`` (a view)."""
    lo, hi = expert_range(w.shape[0], group)
    return w[lo:hi]


class _Experts(torch.autograd.Function):
    """Dispatch + the local experts + combine as one function, so that the backward runs the registered experts
    backward with the real routing weights on the expert's rank: the single-process arithmetic, row for row
    (a composition of dispatch/combine would weight dout before the GEMM instead of after it)."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, weights, handle, activation):
        rows = handle.send(permute_tokens(x, handle))  # [N, H] received order (grouped_swiglu groups them itself)
        # each slot's routing weight goes with its row: the kernel weights and rounds each slot's product as it does
        # on one process, and the combine sums the rounded products in fp32 (unit weights: exact)
        w_rows = handle.send(weights.reshape(-1)[handle.sorted_slots.long()][:, None])  # [N, 1] fp32
        ids = handle.recv_ids[:, None]  # [N, 1] local expert ids
        save = any(ctx.needs_input_grad[:4])
        y, h, gu = torch.ops.qwen3moe.grouped_swiglu(rows, w_gate_up, w_down, ids, w_rows, save_activations=save,
                                                     activation=activation)
        if save:
            ctx.save_for_backward(rows, h, gu, w_gate_up, w_down, w_rows)
        ctx.handle, ctx.activation, ctx.T, ctx.k = handle, activation, weights.shape[0], weights.shape[1]
        return sum_slots(handle.send_back(y), ctx.T, ctx.k, handle.inv)

    @staticmethod
    def backward(ctx, dout):
        rows, h, gu, w_gate_up, w_down, w_rows = ctx.saved_tensors
        hd = ctx.handle
        need_x, need_wgu, need_wd, need_w, _, _ = ctx.needs_input_grad
        T, k = ctx.T, ctx.k
        # Each slot's dout row to its expert's rank (its routing weight is there since the forward); the flags
        # agree across ranks (checked by the dispatch), so every rank runs the same exchanges.
        dout_rows = hd.send(permute_tokens(dout.contiguous(), hd))
        ids = hd.recv_ids[:, None]
        dx_rows, dwgu, dwd, dw_rows = torch.ops.qwen3moe.grouped_swiglu_backward(
            dout_rows, rows, h, gu, w_gate_up, w_down, ids, w_rows, need_dx=need_x, need_dw_gate_up=need_wgu,
            need_dw_down=need_wd, activation=ctx.activation)
        dx = sum_slots(hd.send_back(dx_rows), T, k, hd.inv) if need_x else None
        dw = hd.send_back(dw_rows)[hd.inv.long()].view(T, k) if need_w else None
        return dx, dwgu if need_wgu else None, dwd if need_wd else None, dw, None, None


def fused_moe(x: torch.Tensor, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, renormalize: bool, group, activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse MoE block for this rank's tokens: ``(out [T, H], router_logits [T, E])``, with the experts
    sharded over ``group`` (see the module doc). ``ops.fused_moe(..., ep_group=group)`` calls this. Every rank of
    the group must call it; a bad argument on any rank (E % world != 0, a shard for another group, shapes that
    differ between ranks) raises on every rank. Differentiable in x, the router and the expert shards."""
    op = "fused_moe"
    _, world = rank_world(group)
    static = checks.FUSED_MOE.encode(
        {"x": x, "router_weight": router_weight, "w_gate_up": w_gate_up, "w_down": w_down},
        {"top_k": top_k, "renormalize": bool(renormalize), "activation": checks.activation_code(activation)})
    local_ok = checks.fused_moe_problem(checks.FUSED_MOE.decode(static + [0, 0]), world) is None
    logits = weights = ids = None
    E = router_weight.shape[0] if local_ok else 0
    needs_grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)  # a non-tensor: checked below
                                                 for t in (x, router_weight, w_gate_up, w_down))
    if local_ok:
        logits = F.linear(x, router_weight)
        route = reference.router_topk if needs_grad or x.dtype not in FLOAT_DTYPES else router_topk
        weights, ids = route(logits, top_k, renormalize)  # the reference's is differentiable in the logits
    handle = plan(x, ids, E, group, checks.FUSED_MOE, static, local_ok, checks.check_fused_moe)
    # rounded as the single-process experts use them (and autograd too); float64 stays float64
    weights = weights.to(x.dtype).to(torch.promote_types(x.dtype, torch.float32))
    if x.dtype in FLOAT_DTYPES and isinstance(activation, str):
        record("fused_moe", f"expert parallel ({x.device.type}, {world} ranks)")
        return _Experts.apply(x, w_gate_up, w_down, weights, handle, activation), logits
    why = (f"the kernels take fp32/fp16/bf16, got {x.dtype}" if x.dtype not in FLOAT_DTYPES
           else "the kernels take an activation name, got a callable")
    fallback(op, f"expert parallel: {why}: the reference experts run between dispatch and combine")
    handle.weights = weights
    rows = _Dispatch.apply(x, handle)
    ids_local = handle.expert_ids[:, None]
    y = reference.moe_experts(rows, w_gate_up, w_down, ids_local, torch.ones(ids_local.shape, device=x.device),
                              activation)
    return _Combine.apply(y, weights, handle), logits


class ExpertParallelMoE(nn.Module):
    """The sparse MoE block holding the full router and this rank's expert shard; ``forward(x [..., H])`` returns
    ``(out [..., H], router_logits [T, E])``. :meth:`from_full` slices the shard out of full weights."""

    def __init__(self, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int,
                 renormalize: bool, group, activation: str = "silu"):
        super().__init__()
        self.router_weight = nn.Parameter(router_weight)
        self.w_gate_up = nn.Parameter(w_gate_up)  # [E/world, 2I, H]
        self.w_down = nn.Parameter(w_down)  # [E/world, H, I]
        self.top_k, self.renormalize, self.group, self.activation = top_k, renormalize, group, activation
        self.expert_range = expert_range(router_weight.shape[0], group)

    @classmethod
    def from_full(cls, router_weight, w_gate_up, w_down, top_k, renormalize, group,
                  activation: str = "silu") -> "ExpertParallelMoE":
        """This rank's block from the full ``[E, ...]`` weights (copies the shard, so the full ones can be freed)."""
        return cls(router_weight.detach().clone(), shard_experts(w_gate_up, group).detach().clone(),
                   shard_experts(w_down, group).detach().clone(), top_k, renormalize, group, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, logits = fused_moe(x.reshape(-1, x.shape[-1]), self.router_weight, self.w_gate_up, self.w_down,
                                self.top_k, self.renormalize, self.group, self.activation)
        return out.reshape(x.shape), logits

    def extra_repr(self) -> str:
        E, H = self.router_weight.shape
        lo, hi = self.expert_range
        return f"hidden={H}, experts={E}, local experts [{lo}, {hi}), top_k={self.top_k}"


__all__ = ["ExpertParallelMoE", "expert_range", "fused_moe", "shard_experts"]
