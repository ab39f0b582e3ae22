"""Token permutation for the sparse MoE block (stable API; kernels follow)."""

from __future__ import annotations

import torch

from .. import dispatch, reference


def moe_sort(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_slots int32 [T*k], inv int32 [T*k], offsets int32 [E+1])`` as ``reference.moe_sort``."""
    dispatch.record("moe_sort", "reference")
    return reference.moe_sort(ids, num_experts)


def moe_align_block(ids: torch.Tensor, num_experts: int, block_size: int):
    """``(padded_slots [P_max], block_expert [P_max // block_size], num_padded [1])`` as the reference."""
    dispatch.record("moe_align_block", "reference")
    return reference.moe_align_block(ids, num_experts, block_size)


def moe_permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[i] = x[sorted_slots[i] // top_k]``, ``[T*k, H]``."""
    dispatch.record("moe_permute", "reference")
    return reference.moe_permute(x, sorted_slots, top_k)


def moe_unpermute(y: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[inv[t*k + j]]`` in fp32, cast to ``y.dtype``."""
    dispatch.record("moe_unpermute", "reference")
    return reference.moe_unpermute(y, weights, inv)
