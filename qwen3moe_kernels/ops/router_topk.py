"""router_topk: the MoE router's selection step, ``torch.ops.qwen3moe.router_topk``.

Computes, for router logits ``[T, E]`` (fp32/bf16/fp16, E <= 512), the fp32 softmax over experts, the top-k
experts and, with ``renormalize``, their weights divided by their sum. Returns ``(weights fp32 [T, k],
ids int32 [T, k])`` ordered by descending probability.

Ties are broken by the lowest expert id (a stable descending sort's order, which the reference pins down and
``torch.topk`` does not promise); a NaN probability counts as the largest value, so a row with a NaN (or +inf)
logit, whose softmax is NaN everywhere, selects experts 0..k-1 with NaN weights, exactly as the reference.

Algorithm (the per-row code in csrc/router_topk.h is shared by the CPU and CUDA kernels): the softmax with a
shared branch-free exp (``exp_nonpos``), then the selection. CUDA: one warp per row, the row in registers; each
probability and its expert id are packed into one 64-bit key whose unsigned order is (probability desc, id asc,
NaN first), and k rounds of a warp max-reduction over the keys pick the k largest; no host synchronisation.
CPU: rows in parallel (at::parallel_for); for k <= 32 a one-pass insertion into a sorted top-k on the float
probabilities (same order; a NaN row directly takes experts 0..k-1), for k > 32 the GPU's 64-bit keys and k
rounds of argmax, NaN rows included. Both give the reference's order, so the result does not depend on the path.

The C++ op is registered in csrc/ops.cpp; its fake (meta) implementation is here.
"""

from __future__ import annotations

import torch

from .. import _ext, dispatch, reference

MAX_EXPERTS = 512


def _check(logits: torch.Tensor, top_k: int) -> None:
    torch._check(logits.dim() == 2, lambda: f"router_topk: logits must be 2-D [T, E], got {logits.dim()} dims")
    torch._check(
        logits.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"router_topk: logits must be float32, bfloat16 or float16, got {logits.dtype}",
    )
    E = logits.shape[1]
    torch._check(1 <= E <= MAX_EXPERTS, lambda: f"router_topk: logits.size(1) must be in [1, {MAX_EXPERTS}], got {E}")
    torch._check(1 <= top_k <= E, lambda: f"router_topk: top_k must be in [1, E={E}], got {top_k}")


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::router_topk")
    def _router_topk_fake(logits, top_k, renormalize):
        _check(logits, top_k)
        T = logits.shape[0]
        return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32)

    @torch.library.register_fake("qwen3moe::router_topk.out")
    def _router_topk_out_fake(logits, top_k, renormalize, *, weights, ids):
        _check(logits, top_k)
        return None


def router_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T, k], ids int32 [T, k])``: softmax, top-k (ties: lowest id), optional renormalisation.

    ``out=(weights, ids)`` writes into preallocated buffers (decode, CUDA graphs) and returns them.
    """
    impl = _ext.kernel_impl(logits.device)
    if impl is None:
        if not torch.compiler.is_compiling():
            dispatch.fallback("router_topk", _ext.no_kernel_reason(logits.device))
        w, i = reference.router_topk(logits, top_k, renormalize)
        if out is not None:
            out[0].copy_(w), out[1].copy_(i)
            return out
        return w, i
    if not torch.compiler.is_compiling():
        dispatch.record("router_topk", impl)
    if out is not None:
        torch.ops.qwen3moe.router_topk.out(logits, top_k, renormalize, weights=out[0], ids=out[1])
        return out
    return torch.ops.qwen3moe.router_topk(logits, top_k, renormalize)
