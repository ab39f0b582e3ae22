"""router_topk: fp32 softmax over experts, top-k, optional renormalisation (stable API; kernels follow)."""

from __future__ import annotations

import torch

from .. import dispatch, reference


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T, k], ids int32 [T, k])`` as ``reference.router_topk``."""
    dispatch.record("router_topk", "reference")
    return reference.router_topk(logits, top_k, renormalize)
