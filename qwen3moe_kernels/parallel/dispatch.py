"""Expert-parallel ``dispatch`` and ``combine``: each (token, choice) slot travels to the rank owning its expert and
its expert output travels back, over ``torch.distributed.all_to_all_single``.

Rank r of a group of ``world`` owns experts ``[r*E/world, (r+1)*E/world)``. ``dispatch(x [T, H], ids [T, k],
weights [T, k], group, num_experts) -> (x_local [N, H], handle)``: x_local holds the N rows this rank's experts
receive, grouped by local expert (``handle.expert_ids [N]``, ``handle.expert_offsets [E/world + 1]``), each
expert's rows in (source rank, slot) order. ``combine(y [N, H], handle) -> [T, H]``: the rows back to their tokens,
``sum_j weights[t, j] * y_slot`` in fp32, j in order, as ``moe_unpermute``. Both are differentiable (the backward is
the reverse exchange). One device-to-host sync per dispatch (the split sizes). Design: ``docs/parallel.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.moe_permute import moe_permute, moe_sort, sum_slots
from . import checks
from .comm import host_device, exchange_equal, exchange_rows, rank_world


@dataclass
class EPHandle:
    """What ``combine`` (and a backward) needs of one dispatch. Source side: this rank's T tokens, k slots each,
    ``sorted_slots``/``inv`` (``moe_sort`` of the global ids: expert order is owner order), ``send_sizes`` rows to
    each rank. Expert side: ``recv_sizes`` rows from each rank, ``recv_ids [N]`` the local expert of each received
    row in received order (source rank, then expert, then slot)."""

    group: object
    rank: int
    world: int
    num_experts: int
    num_tokens: int
    top_k: int
    sorted_slots: torch.Tensor  # [T*k] int32
    inv: torch.Tensor  # [T*k] int32
    send_sizes: list[int]
    recv_sizes: list[int]
    recv_ids: torch.Tensor  # [N] int32, received order
    weights: torch.Tensor | None = None  # [T, k] fp32 rounded to x's dtype (combine's weights)
    _grouping: tuple | None = field(default=None, repr=False)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world

    # ---- moving rows: source (expert-sorted slots) <-> expert side (received order) <-> grouped by local expert

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        """``[T*k, ...]`` in expert-sorted slot order -> ``[N, ...]`` received here, received order."""
        return exchange_rows(rows, self.send_sizes, self.recv_sizes, self.group)

    def send_back(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` in received order -> ``[T*k, ...]`` back at the source, expert-sorted slot order."""
        return exchange_rows(rows, self.recv_sizes, self.send_sizes, self.group)

    def _group(self):
        if self._grouping is None:
            self._grouping = moe_sort(self.recv_ids[:, None], self.num_local_experts)  # stable: (rank, slot) kept
        return self._grouping

    def group_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Received order -> grouped by local expert."""
        return moe_permute(rows, self._group()[0], 1)

    def ungroup_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Grouped by local expert -> received order."""
        return moe_permute(rows, self._group()[1], 1)

    @property
    def expert_offsets(self) -> torch.Tensor:
        """``[E/world + 1]`` int32: where each local expert's rows start in the grouped order."""
        return self._group()[2]

    @property
    def expert_ids(self) -> torch.Tensor:
        """``[N]`` int32: the local expert (0 .. E/world - 1) of each grouped row, ascending."""
        return self.recv_ids[self._group()[0].long()]


def _device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: the copy does not synchronise the host with the device
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def plan(x: torch.Tensor, ids: torch.Tensor | None, num_experts: int, group, schema: checks.Schema,
         static: list[int], local_ok: bool, check) -> EPHandle:
    """The exchange plan of one dispatch, after checking every rank's arguments (``check`` raises on every rank).

    ``static``: this rank's encoded fields (``schema.encode``); ``local_ok``: whether they pass this rank's own
    checks (``ids`` may be None when not: nothing is computed from arguments that failed). Exchanges:
    1. ``[world, F]`` int64 headers: the rows for that rank, the fields, ids' min and max;
    2. the one device-to-host read: the split sizes and every rank's fields; then the checks;
    3. ``[world, E/world]`` per-expert counts, so each rank knows the local expert of every row it receives.
    """
    rank, world = rank_world(group)
    dev = x.device if isinstance(x, torch.Tensor) else host_device(group)  # x not a tensor: reported below
    if local_ok:
        El = num_experts // world
        flat = ids.reshape(-1).long().clamp(0, num_experts - 1)  # out-of-range ids are reported below, not used
        counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
        sends = counts.view(world, El).sum(1)
        minmax = torch.stack(torch.aminmax(ids.reshape(-1))).long() if ids.numel() else sends.new_zeros(2)
    else:
        sends, minmax = torch.zeros(world, dtype=torch.int64, device=dev), torch.zeros(2, dtype=torch.int64, device=dev)
    header = torch.cat([sends[:, None], _device_ints(static, dev).expand(world, -1), minmax.expand(world, -1)], 1)
    recv = exchange_equal(header, group)  # row s: rank s's rows for us, its fields, its ids' range
    host = torch.cat([sends, recv.reshape(-1)]).tolist()  # the dispatch's one device-to-host sync
    width = header.shape[1]
    rows = [host[world + s * width : world + (s + 1) * width] for s in range(world)]
    check([schema.decode(row[1:]) for row in rows])  # every rank: the same fields, so the same exception
    if not local_ok:  # unreachable: this rank's own fields failed the checks just run
        raise RuntimeError("expert parallelism: local argument check and group check disagree")
    send_sizes, recv_sizes = host[:world], [row[0] for row in rows]
    sorted_slots, inv, _ = moe_sort(ids, num_experts)
    recv_counts = exchange_equal(counts.view(world, El), group)  # [world, El]: rows for each of my experts
    local = torch.arange(El, dtype=torch.int32, device=dev).repeat(world)
    recv_ids = local.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_sizes))  # no host sync
    return EPHandle(group, rank, world, num_experts, ids.shape[0], ids.shape[1], sorted_slots, inv, send_sizes,
                    recv_sizes, recv_ids)


# --------------------------------------------------------------------------------------- row arithmetic


def permute_tokens(x: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """``x [T, H]`` -> ``[T*k, H]``, slot s's token row at s's expert-sorted position."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return moe_permute(x, handle.sorted_slots, handle.top_k)


# ------------------------------------------------------------------------------------------- autograd


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        return handle.group_rows(handle.send(permute_tokens(x, handle)))

    @staticmethod
    def backward(ctx, g):
        h = ctx.handle
        back = h.send_back(h.ungroup_rows(g.contiguous()))  # [T*k, H]: each slot's gradient, at its token's rank
        return sum_slots(back, h.num_tokens, h.top_k, h.inv), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, handle):
        back = handle.send_back(handle.ungroup_rows(y.contiguous()))  # [T*k, H] expert-sorted slot order
        ctx.handle = handle
        ctx.save_for_backward(back, weights)
        return sum_slots(back, handle.num_tokens, handle.top_k, handle.inv, weights)

    @staticmethod
    def backward(ctx, dout):
        back, weights = ctx.saved_tensors
        h = ctx.handle
        T, k = weights.shape
        dout = dout.contiguous()
        w_sorted = weights.reshape(-1)[h.sorted_slots.long()]  # [T*k] expert-sorted
        acc = weights.dtype  # fp32 (float64 for float64)
        # d rows = weights * dout in fp32, rounded once (the product the single-process backward forms too)
        d_rows = (permute_tokens(dout, h).to(acc) * w_sorted[:, None]).to(back.dtype)
        dy = h.group_rows(h.send(d_rows))  # every rank takes part, whatever it needs
        dw = None
        if ctx.needs_input_grad[1]:
            slots = back[h.inv.long()].to(acc).view(T, k, back.shape[1])  # [T, k, H] slot order
            dw = (slots * dout.to(acc)[:, None, :]).sum(-1)
        return dy, dw, None


# ----------------------------------------------------------------------------------------------- API


def dispatch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, group, num_experts: int
             ) -> tuple[torch.Tensor, EPHandle]:
    """Send each slot's token row to the rank owning its expert. ``x [T, H]`` this rank's tokens; ``ids [T, k]``
    global expert ids in ``[0, num_experts)``; ``weights [T, k]`` the routing weights (kept for ``combine``, rounded
    to x's dtype as the single-process experts use them); ``group`` a ``torch.distributed`` group (None: the default
    group) of ``world`` ranks with ``num_experts % world == 0``. Returns ``(x_local [N, H], handle)``, x_local
    grouped by local expert (see ``handle.expert_ids``, ``handle.expert_offsets``). Differentiable in x (and,
    through ``combine``, in weights). A bad argument on any rank raises on every rank (TypeError for a dtype,
    ValueError for a shape or value). Every rank of the group must call it, T = 0 included."""
    fields = {"x": x, "ids": ids, "weights": weights}
    static = checks.DISPATCH.encode(fields, {"num_experts": num_experts})
    _, world = rank_world(group)
    local_ok = checks.dispatch_problem(checks.DISPATCH.decode(static + [0, 0]), world) is None
    handle = plan(x, ids, num_experts, group, checks.DISPATCH, static, local_ok, checks.check_dispatch)
    # in autograd: the rounding's gradient, as moe_experts; fp32 (float64 for float64 x)
    handle.weights = weights.to(x.dtype).to(torch.promote_types(x.dtype, torch.float32))
    return _Dispatch.apply(x, handle), handle


def combine(y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """The expert outputs ``y [N, H]`` (grouped as ``dispatch`` returned the rows) back to their tokens:
    ``out [T, H] = sum_j weights[t, j] * y_slot`` in fp32, j in order, one rounding to y's dtype (as
    ``moe_unpermute``). Differentiable in y and the dispatch's weights. Every rank must call it."""
    if y.dim() != 2 or y.shape[0] != sum(handle.recv_sizes):
        raise ValueError(f"combine: y must be [N={sum(handle.recv_sizes)}, H] (the rows dispatch returned), "
                         f"got {list(y.shape)}")
    return _Combine.apply(y, handle.weights, handle)
