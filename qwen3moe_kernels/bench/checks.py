"""The result checks every benchmark runs before timing: a wrong implementation gets no number.

fp32 outputs use the tolerance table (``qwen3moe_kernels.tolerances``); bf16/fp16 outputs of the MoE block the
flash-attention rule: at most twice the error of PyTorch's own low-precision computation against an fp32
reference on the same routing (``experts_fp32``). Layouts: x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I],
ids and weights [T, k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..tolerances import TOL, twice_torch_error_bound


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.float() - ref.float()).abs().max().item()


def close_bound(ref: torch.Tensor, kind: str, dtype: torch.dtype) -> float:
    """The max-abs error ``assert_close(atol, rtol)`` of the table allows against ``ref`` (worst element)."""
    atol, rtol = TOL[kind][dtype]
    return atol + rtol * (ref.float().abs().max().item() if ref.numel() else 0.0)


def close_ok(out: torch.Tensor, ref: torch.Tensor, kind: str, dtype: torch.dtype) -> bool:
    atol, rtol = TOL[kind][dtype]
    if out.shape != ref.shape:
        return False
    return bool(torch.isclose(out.float(), ref.float(), atol=atol, rtol=rtol).all()) if out.numel() else True


def experts_fp32(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """``reference.moe_experts`` in fp32 -> [T, H] fp32, converting only the experts hit, one at a time: an fp32
    copy of all 128 experts of Qwen3-30B-A3B would be 2.4 GB."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    weights = weights.to(x.dtype).float()  # the routing weights the model applies, in its dtype
    ids = ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        h = reference.swiglu(F.linear(x[tok].float(), w_gate_up[e].float()))
        out.index_add_(0, tok, F.linear(h, w_down[e].float()) * weights[tok, slot, None])
    return out


def router_tied_tokens(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T] bool: tokens whose k-th and (k+1)-th router probabilities are equal, where any choice is correct.

    bf16 logits carry 8 significant bits, so at prefill sizes some tokens tie at the top-k boundary; the spec
    breaks ties by the lowest expert id, ``torch.topk`` (transformers) by whatever its kernel does.
    """
    probs = torch.softmax(F.linear(x, router_weight).float(), dim=-1)
    if top_k >= probs.shape[-1]:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    top = torch.topk(probs, top_k + 1, dim=-1).values
    return top[:, top_k - 1] == top[:, top_k]


def check_moe_block(out: torch.Tensor, x: torch.Tensor, weights: dict, top_k: int,
                    ref_lowp: torch.Tensor) -> tuple[float, float, bool]:
    """(max error, allowed, ok) of a block output against the reference, tokens tied at the top-k boundary left out.

    fp32: the table's "gemm" tolerance. bf16/fp16: twice the error of ``ref_lowp`` (the reference in x.dtype)
    against :func:`experts_fp32` on the low-precision router's routing (an fp32 router would flip near-tied
    experts and measure only that). ``weights``: router_weight, w_gate_up, w_down.
    """
    if out.shape != ref_lowp.shape:
        return float("inf"), 0.0, False
    keep = ~router_tied_tokens(x, weights["router_weight"], top_k)
    if x.dtype == torch.float32:
        o, r = out[keep], ref_lowp[keep]
        return max_abs_err(o, r), close_bound(r, "gemm", x.dtype), close_ok(o, r, "gemm", x.dtype)
    routing, ids = reference.router_topk(F.linear(x, weights["router_weight"]), top_k, True)
    ref32 = experts_fp32(x, weights["w_gate_up"], weights["w_down"], ids, routing)[keep]
    err = max_abs_err(out[keep], ref32)
    bound = twice_torch_error_bound(ref32, ref_lowp[keep])
    return err, bound, bool(err <= bound)
