"""Token permutation: ``moe_sort``, ``moe_align_block``, ``moe_permute``, ``moe_unpermute`` (``torch.ops.qwen3moe``).

Slot ``s = t*k + j`` is token t's j-th expert choice (``reference``'s layout); all indices are int32.

* ``moe_sort(ids [T, k], E) -> (sorted_slots [T*k], inv [T*k], offsets [E+1])``: the slots grouped by expert,
  stably; ``inv[s]`` is slot s's position in that order.
* ``moe_align_block(ids, E, block) -> (padded_slots [P_max], block_expert [P_max / block], num_padded [1])``: the
  same order, each expert's group padded to a multiple of ``block`` (sentinel ``T*k``); ``P_max`` from shapes alone.
* ``moe_permute(x [T, H], slots, k) -> [len(slots), H]``: ``out[i] = x[slots[i] // k]`` (zero row for the sentinel).
* ``moe_unpermute(y [T*k, H], weights fp32 [T, k], inv) -> [T, H]``: ``sum_j weights[t, j] * y[inv[t*k + j]]`` in
  fp32, j = 0..k-1 in order (deterministic).

Kernels: ``csrc/moe_permute_cpu.cpp``, ``csrc/moe_permute.cu`` (shared index arithmetic in ``csrc/moe_permute.h``);
algorithms in ``docs/ops/moe_permute.md``.
"""

from __future__ import annotations

import torch

from .. import _ext, reference
from ..recorder import fallback, record
from ._checks import FLOAT_DTYPES, check, check_dtype

MAX_EXPERTS = 512
_IDS = (torch.int32, torch.int64)


def _check_ids(op: str, ids: torch.Tensor, num_experts: int) -> None:
    check_dtype(op, "ids", ids, _IDS)
    check(op, 1 <= num_experts <= MAX_EXPERTS, lambda: f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")


def padded_bound(numel, num_experts: int, block_size: int):
    """``P_max`` of :func:`moe_align_block`: the padded length bound, from shapes alone."""
    return (numel + num_experts * (block_size - 1) + block_size - 1) // block_size * block_size


def _check_unpermute(y, weights, inv):
    check("moe_unpermute", y.dim() == 2, lambda: f"y must be 2-D [T*k, H], got shape {list(y.shape)}")
    check_dtype("moe_unpermute", "weights", weights, (torch.float32,))
    check("moe_unpermute", weights.dim() == 2, lambda: f"weights must be [T, k], got shape {list(weights.shape)}")
    check_dtype("moe_unpermute", "inv", inv, (torch.int32,))
    check("moe_unpermute", inv.dim() == 1 and inv.shape[0] == weights.shape[0] * weights.shape[1],
          lambda: f"inv must be [T*k = {weights.shape[0] * weights.shape[1]}], got shape {list(inv.shape)}")


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::moe_sort")
    def _moe_sort_fake(ids, num_experts):
        _check_ids("moe_sort", ids, num_experts)
        n = ids.numel()
        return (ids.new_empty((n,), dtype=torch.int32), ids.new_empty((n,), dtype=torch.int32),
                ids.new_empty((num_experts + 1,), dtype=torch.int32))

    @torch.library.register_fake("qwen3moe::moe_align_block")
    def _moe_align_block_fake(ids, num_experts, block_size):
        _check_ids("moe_align_block", ids, num_experts)
        check("moe_align_block", 1 <= block_size <= 4096, lambda: f"block_size must be in [1, 4096], got {block_size}")
        p_max = padded_bound(ids.numel(), num_experts, block_size)
        return (ids.new_empty((p_max,), dtype=torch.int32), ids.new_empty((p_max // block_size,), dtype=torch.int32),
                ids.new_empty((1,), dtype=torch.int32))

    @torch.library.register_fake("qwen3moe::moe_permute")
    def _moe_permute_fake(x, sorted_slots, top_k):
        check("moe_permute", x.dim() == 2, lambda: f"x must be 2-D [T, H], got shape {list(x.shape)}")
        check_dtype("moe_permute", "sorted_slots", sorted_slots, (torch.int32,))
        check("moe_permute", sorted_slots.dim() == 1, "sorted_slots must be 1-D")
        check("moe_permute", top_k >= 1, lambda: f"top_k must be >= 1, got {top_k}")
        return x.new_empty((sorted_slots.shape[0], x.shape[1]))

    @torch.library.register_fake("qwen3moe::moe_unpermute")
    def _moe_unpermute_fake(y, weights, inv):
        _check_unpermute(y, weights, inv)
        return y.new_empty((weights.shape[0], y.shape[1]))

    @torch.library.register_fake("qwen3moe::moe_unpermute.out")
    def _moe_unpermute_out_fake(y, weights, inv, *, out):
        _check_unpermute(y, weights, inv)


def _kernel(op: str, device: torch.device) -> bool:
    """Record what runs; True when the compiled kernel serves ``device``."""
    impl = _ext.kernel_impl(device)
    if impl is None:
        fallback(op, _ext.no_kernel_reason(device))
    else:
        record(op, impl)
    return impl is not None


def moe_sort(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_slots [T*k], inv [T*k], offsets [E+1])``, int32: the slots grouped by expert, stably."""
    if not _kernel("moe_sort", ids.device):
        return reference.moe_sort(ids, num_experts)
    return torch.ops.qwen3moe.moe_sort(ids, num_experts)


def moe_align_block(
    ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(padded_slots [P_max], block_expert [P_max // block_size], num_padded [1])``, int32 (see module doc)."""
    if not _kernel("moe_align_block", ids.device):
        return reference.moe_align_block(ids, num_experts, block_size)
    return torch.ops.qwen3moe.moe_align_block(ids, num_experts, block_size)


def moe_permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[i] = x[sorted_slots[i] // top_k]`` (zero row for the sentinel ``T*top_k``), ``[len(slots), H]``."""
    if not _kernel("moe_permute", x.device):
        return reference.moe_permute(x, sorted_slots, top_k)
    return torch.ops.qwen3moe.moe_permute(x, sorted_slots, top_k)


def moe_unpermute(
    y: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[inv[t*k + j]]`` in fp32, cast to ``y.dtype``; ``[T, H]``. ``weights`` may
    be any float dtype (converted to fp32 exactly); ``out`` a preallocated ``[T, H]`` buffer of ``y.dtype``."""
    if not _kernel("moe_unpermute", y.device):
        res = reference.moe_unpermute(y, weights, inv)
        return res if out is None else out.copy_(res)
    weights = weights.float().contiguous()  # [T, k]: negligible next to y
    if out is None:
        return torch.ops.qwen3moe.moe_unpermute(y, weights, inv)
    torch.ops.qwen3moe.moe_unpermute.out(y, weights, inv, out=out)
    return out


def sum_slots(rows: torch.Tensor, T: int, k: int, inv: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j rows[inv[t*k + j]]``, ``[T, H]`` in rows' dtype: each token's k slot rows summed (weighted
    by ``weights [T, k]`` when given).

    ``moe_unpermute`` (unit weights by default): fp32 (float64 for float64 rows, through the reference) in the order
    j = 0..k-1, one rounding (``1.0 * v`` and the add are exact), so deterministic, and bit for bit the Triton
    ``sum_slots`` kernel's sum over slot-ordered rows. Not ``rows.view(T, k, H).sum(1)``: torch's reduction order
    and accumulation dtype are implementation details."""
    if weights is None:
        weights = torch.ones((T, k), dtype=torch.float32, device=rows.device)
    if rows.dtype in FLOAT_DTYPES:
        return moe_unpermute(rows, weights, inv)
    return reference.moe_unpermute(rows, weights, inv)

