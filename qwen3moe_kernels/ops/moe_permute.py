"""Token permutation for the sparse MoE block: ``torch.ops.qwen3moe.{moe_sort, moe_align_block, moe_permute,
moe_unpermute}``.

Layout (as ``qwen3moe_kernels.reference``): slot ``s = t * k + j`` is the j-th expert choice of token t.

* ``moe_sort(ids [T, k], E) -> (sorted_slots [T*k], inv [T*k], offsets [E+1])``, all int32: the slots grouped by
  expert, stably (ascending slot id within an expert); ``inv[s]`` is the position of slot s in that order;
  ``offsets`` the start of each expert's group (its differences are the per-expert counts).
* ``moe_align_block(ids, E, block_size) -> (padded_slots [P_max], block_expert [P_max // block_size],
  num_padded [1])``: the same order with each expert's group padded to a multiple of ``block_size``, as
  block-tiled grouped GEMMs consume it. ``P_max = round_up(T*k + E*(block_size-1), block_size)`` depends on
  shapes only, so no device-to-host synchronisation is needed; padding holds the sentinel ``T*k``; blocks past
  ``num_padded`` have expert ``-1``; an expert without slots gets no block.
* ``moe_permute(x [T, H], slots, top_k) -> [len(slots), H]``: ``out[i] = x[slots[i] // top_k]``; the sentinel
  ``T*k`` gives a zero row (so ``padded_slots`` can be gathered directly).
* ``moe_unpermute(y [T*k, H], weights fp32 [T, k], inv) -> [T, H]``: ``out[t] = sum_j weights[t, j] *
  y[inv[t*k+j]]`` accumulated in fp32 in the order j = 0..k-1 by one thread per output element (no atomics:
  deterministic), cast to ``y.dtype``. With one-hot weights ``unpermute(permute(x))`` is exactly ``x``.

Algorithms: CPU (csrc/moe_permute_cpu.cpp): a parallel stable counting sort (per-chunk histograms, a scan,
per-chunk scatters); permute/unpermute parallel over rows. CUDA (csrc/moe_permute.cu): the same counting sort
in three kernels (per-chunk warp histograms, one scan block, per-chunk warp scatters ranking equal experts with
``__match_any_sync``), vectorised row copies and a vectorised per-token combine; all graph-capturable.

Expert ids outside ``[0, E)`` are an error (CPU: a RuntimeError naming the position; CUDA: a device-side
assertion, reported at the next synchronisation, since checking on the host would need a sync).
"""

from __future__ import annotations

import torch

from .. import _ext, dispatch, reference

MAX_EXPERTS = 512


def _check_ids(ids: torch.Tensor, num_experts: int, op: str) -> None:
    torch._check(ids.dtype in (torch.int32, torch.int64), lambda: f"{op}: ids must be int32 or int64, got {ids.dtype}")
    torch._check(1 <= num_experts <= MAX_EXPERTS,
                 lambda: f"{op}: num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")


def padded_bound(numel, num_experts: int, block_size: int):
    """``P_max`` of :func:`moe_align_block`: the padded length bound, from shapes alone."""
    return (numel + num_experts * (block_size - 1) + block_size - 1) // block_size * block_size


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::moe_sort")
    def _moe_sort_fake(ids, num_experts):
        _check_ids(ids, num_experts, "moe_sort")
        n = ids.numel()
        return (ids.new_empty((n,), dtype=torch.int32), ids.new_empty((n,), dtype=torch.int32),
                ids.new_empty((num_experts + 1,), dtype=torch.int32))

    @torch.library.register_fake("qwen3moe::moe_align_block")
    def _moe_align_block_fake(ids, num_experts, block_size):
        _check_ids(ids, num_experts, "moe_align_block")
        torch._check(1 <= block_size <= 4096, lambda: f"moe_align_block: block_size must be in [1, 4096], got {block_size}")
        p_max = padded_bound(ids.numel(), num_experts, block_size)
        return (ids.new_empty((p_max,), dtype=torch.int32), ids.new_empty((p_max // block_size,), dtype=torch.int32),
                ids.new_empty((1,), dtype=torch.int32))

    @torch.library.register_fake("qwen3moe::moe_permute")
    def _moe_permute_fake(x, sorted_slots, top_k):
        torch._check(x.dim() == 2, lambda: f"moe_permute: x must be 2-D [T, H], got {x.dim()} dims")
        torch._check(sorted_slots.dim() == 1 and sorted_slots.dtype == torch.int32,
                     lambda: "moe_permute: sorted_slots must be a 1-D int32 tensor")
        torch._check(top_k >= 1, lambda: f"moe_permute: top_k must be >= 1, got {top_k}")
        return x.new_empty((sorted_slots.shape[0], x.shape[1]))

    def _check_unpermute(y, weights, inv):
        torch._check(y.dim() == 2, lambda: f"moe_unpermute: y must be 2-D, got {y.dim()} dims")
        torch._check(weights.dim() == 2 and weights.dtype == torch.float32,
                     lambda: "moe_unpermute: weights must be a float32 [T, k] tensor")
        torch._check(inv.dim() == 1 and inv.dtype == torch.int32, lambda: "moe_unpermute: inv must be 1-D int32")
        torch._check(inv.shape[0] == weights.shape[0] * weights.shape[1],
                     lambda: "moe_unpermute: inv must have T*k entries")

    @torch.library.register_fake("qwen3moe::moe_unpermute")
    def _moe_unpermute_fake(y, weights, inv):
        _check_unpermute(y, weights, inv)
        return y.new_empty((weights.shape[0], y.shape[1]))

    @torch.library.register_fake("qwen3moe::moe_unpermute.out")
    def _moe_unpermute_out_fake(y, weights, inv, *, out):
        _check_unpermute(y, weights, inv)
        return None


def _run(op: str, device: torch.device) -> bool:
    """Record what runs; True when the compiled kernel serves ``device``."""
    impl = _ext.kernel_impl(device)
    if not torch.compiler.is_compiling():
        if impl is None:
            dispatch.fallback(op, _ext.no_kernel_reason(device))
        else:
            dispatch.record(op, impl)
    return impl is not None


def moe_sort(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_slots int32 [T*k], inv int32 [T*k], offsets int32 [E+1])``: the slots grouped by expert, stably."""
    if not _run("moe_sort", ids.device):
        return reference.moe_sort(ids, num_experts)
    return torch.ops.qwen3moe.moe_sort(ids, num_experts)


def moe_align_block(
    ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(padded_slots [P_max], block_expert [P_max // block_size], num_padded [1])``, int32 (see module doc)."""
    if not _run("moe_align_block", ids.device):
        return reference.moe_align_block(ids, num_experts, block_size)
    return torch.ops.qwen3moe.moe_align_block(ids, num_experts, block_size)


def moe_permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[i] = x[sorted_slots[i] // top_k]`` (zero row for the sentinel ``T*top_k``), ``[len(slots), H]``."""
    if not _run("moe_permute", x.device):
        return reference.moe_permute(x, sorted_slots, top_k)
    return torch.ops.qwen3moe.moe_permute(x, sorted_slots, top_k)


def moe_unpermute(
    y: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[inv[t*k + j]]`` in fp32, cast to ``y.dtype``; ``[T, H]``.

    ``out`` (optional) is a preallocated ``[T, H]`` buffer of ``y.dtype``.
    """
    if not _run("moe_unpermute", y.device):
        res = reference.moe_unpermute(y, weights, inv)
        return res if out is None else out.copy_(res)
    weights = weights.float().contiguous()  # [T, k]: negligible next to y
    if out is not None:
        torch.ops.qwen3moe.moe_unpermute.out(y, weights, inv, out=out)
        return out
    return torch.ops.qwen3moe.moe_unpermute(y, weights, inv)
