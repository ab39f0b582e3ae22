"""The grouped-GEMM SwiGLU experts as torch.library ops: ``torch.ops.qwen3moe.grouped_swiglu`` and
``grouped_swiglu_backward`` (the whole expert forward and backward, which ``moe_experts`` runs) and their parts
``torch.ops.qwen3moe.grouped_swiglu_{gate_up, down, down_backward, gate_up_backward}``.

Slot ``s = t*k + j`` is token t's j-th expert choice ``e = ids[t, j]`` (see ``reference``). Every op takes the
routing as ``ids [T, k]`` (int32/int64) and groups the slots by expert itself, so its meaning does not depend on
any tile size.

* ``grouped_swiglu_gate_up(x [T, H], w_gate_up [E, 2I, H], ids, save_gate_up) -> (h [T*k, I], gate_up)``:
  ``gate_up[s] = x[t] @ w_gate_up[e].T`` (fp32 accumulation), ``h[s] = silu(gate) * up`` in x's dtype. ``gate_up``
  is ``[T*k, 2I]`` when ``save_gate_up`` (the backward needs the pre-activations), else an empty ``[0, 2I]``.
* ``grouped_swiglu_down(h [T*k, I], w_down [E, H, I], ids, weights fp32 [T, k]) -> out [T, H]``:
  ``out[t] = sum_j weights[t, j] * (h[t*k+j] @ w_down[e].T)``, each product accumulated in fp32, the sum over j
  in fp32 in the order j = 0..k-1 (deterministic), cast to h's dtype. The weights are first rounded to h's dtype
  (as transformers multiplies by them in the activations' dtype; every op that takes them does so). For fp16/bf16
  the Triton path rounds each weighted product to h's dtype before that sum (half the per-slot bytes; within the
  tests' tolerances).
* ``grouped_swiglu(x, w_gate_up, w_down, ids, weights, save_activations) -> (out [T, H], h, gate_up)``: gate_up
  then down, bit for bit what the two ops give, over one grouping of the slots (on CUDA one ``moe_align_block``
  when both configs share BLOCK_M, instead of one per op; on CPU one ``moe_sort``, and h stays in expert order
  between the GEMMs). ``h`` and ``gate_up`` (slot order) are returned when ``save_activations`` (the backward's
  inputs), else empty ``[0, ...]`` tensors. ``moe_experts`` calls it, with and without a gradient.
* ``grouped_swiglu_down_backward(dout [T, H], h, gate_up, w_down, ids, weights, need_weight_grad) ->
  (d_gate_up [T*k, 2I], d_w_down [E, H, I], d_weights fp32 [T, k])``: the gradients of ``down(swiglu(gate_up))`` (SwiGLU backward
  included): ``g = dout[t] @ w_down[e]``, ``d_weights[t, j] = <g, h[s]>``, ``dh = weights * g``,
  ``d_w_down[e] = sum_s (weights[s] dout[t])^T h[s]``.
* ``grouped_swiglu_gate_up_backward(d_gate_up, x, w_gate_up, ids, need_weight_grad) -> (dx [T, H],
  d_w_gate_up [E, 2I, H])``: ``dx[t] = sum_j d_gate_up[s] @ w_gate_up[e]`` (fp32, fixed order; as in
  the down op, the Triton path rounds each slot's product to x's dtype first),
  ``d_w_gate_up[e] = sum_s d_gate_up[s]^T x[t]``.
* ``grouped_swiglu_backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dw_gate_up,
  need_dw_down) -> (dx, d_w_gate_up, d_w_down, d_weights)``: the two backward ops above in one, bit for bit, over
  one grouping of the slots (on CUDA one alignment when their configs share BLOCK_M and one ``moe_sort`` for both
  weight gradients; on CPU one ``moe_sort``, d_gate_up kept in expert order). A gradient not asked for is not
  computed and comes back empty ``[0, ...]``; d_weights always is.
* With ``need_weight_grad=False`` (frozen experts) the weight gradient is not computed and comes back as an
  empty ``[0, ...]`` tensor: the per-expert ``A^T B`` GEMM is a third of the backward's work.

Implementations: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests run the
kernels without a GPU) launch the Triton kernels of ``kernels/grouped_swiglu.py`` over ``moe_align_block`` /
``moe_sort`` orders. CPU tensors otherwise run one torch matrix product per expert over its rows (all of them in
one ``torch._grouped_mm`` call where its stride rules allow, as at every real shape: the same bits without the
Python loop), with the registered permutation ops around them: ``moe_sort`` groups the slots, ``moe_permute``
gathers the rows into expert order once (and back to slot order by ``inv``), ``moe_unpermute`` does the down op's
fp32 combine (and dx's sum over the k slots) straight from expert order; bf16 computes in fp32 on CPUs without
native bf16 dot products (``cpu.native_bf16``; then the loop, converting only the hit experts' weights). The same
torch code serves a GPU where triton is missing, recorded as a fallback.
Importing this module does not import triton (the kernels module is imported on the first Triton launch).
Autograd for the whole expert computation is in ``ops/fused_moe.py`` (``moe_experts``), which composes these ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from .. import dispatch
from .moe_permute import moe_align_block, moe_permute, moe_sort, moe_unpermute

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ checks


def _check_float(op, name, t, dtype=None, device=None, dim=None):
    torch._check(t.dtype in _DTYPES if dtype is None else t.dtype == dtype,
                 lambda: f"{op}: {name} must be {'fp32/fp16/bf16' if dtype is None else dtype}, got {t.dtype}")
    if device is not None:
        torch._check(t.device == device, lambda: f"{op}: {name} is on {t.device}, expected {device} (x's device)")
    if dim is not None:
        torch._check(t.dim() == dim, lambda: f"{op}: {name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_ids(op: str, ids: torch.Tensor, T, E, device) -> None:
    """ids [T, k] int32/int64 with 1 <= k <= E; values in [0, E) (checked on CPU; a CUDA check would need a
    host sync, so there moe_align_block's device-side assertion reports them)."""
    torch._check(ids.dtype in (torch.int32, torch.int64), lambda: f"{op}: ids must be int32 or int64, got {ids.dtype}")
    torch._check(ids.device == device, lambda: f"{op}: ids is on {ids.device}, expected {device}")
    torch._check(ids.dim() == 2 and ids.shape[0] == T, lambda: f"{op}: ids must be [T={T}, top_k], got {tuple(ids.shape)}")
    k = ids.shape[1]
    torch._check(1 <= k, lambda: f"{op}: top_k (ids.shape[1]) must be >= 1, got {k}")
    torch._check(k <= E, lambda: f"{op}: top_k (ids.shape[1]) = {k} exceeds the number of experts E = {E}")
    if ids.device.type == "cpu" and ids.numel() and not isinstance(ids, FakeTensor):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            pos = tuple(int(i) for i in (ids == bad).nonzero()[0])
            raise ValueError(f"{op}: ids{list(pos)} = {bad} is not an expert id in [0, E={E})")


def _check_weights(op, weights, T, k, device):
    torch._check(weights.dtype == torch.float32, lambda: f"{op}: weights must be float32 (the router's), got {weights.dtype}")
    torch._check(weights.device == device, lambda: f"{op}: weights is on {weights.device}, expected {device}")
    torch._check(tuple(weights.shape) == (T, k), lambda: f"{op}: weights must be [T={T}, k={k}], got {tuple(weights.shape)}")


def _check_gate_up(op, x, w_gate_up, ids):
    _check_float(op, "x", x, dim=2)
    T, H = x.shape
    _check_float(op, "w_gate_up", w_gate_up, x.dtype, x.device, 3)
    torch._check(w_gate_up.shape[2] == H and w_gate_up.shape[1] % 2 == 0 and w_gate_up.shape[1] > 0,
                 lambda: f"{op}: w_gate_up must be [E, 2I, H={H}], got {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    check_ids(op, ids, T, E, x.device)
    return T, H, E, I, ids.shape[1]


def _check_down(op, h, w_down, ids, weights):
    _check_float(op, "h", h, dim=2)
    _check_float(op, "w_down", w_down, h.dtype, h.device, 3)
    E, H, I = w_down.shape
    torch._check(h.shape[1] == I, lambda: f"{op}: h must be [T*k, I={I}] (w_down is [E, H, I]), got {tuple(h.shape)}")
    torch._check(weights.dim() == 2, lambda: f"{op}: weights must be [T, k], got shape {tuple(weights.shape)}")
    T = weights.shape[0]
    check_ids(op, ids, T, E, h.device)
    k = ids.shape[1]
    _check_weights(op, weights, T, k, h.device)
    torch._check(h.shape[0] == T * k, lambda: f"{op}: h must have T*k = {T * k} rows, got {h.shape[0]}")
    return T, H, E, I, k


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    if not _triton_available():
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _record(op: str, t: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    if _use_triton(t):
        dispatch.record(op, "triton")
    elif t.device.type == "cpu":
        dispatch.record(op, "cpu")
    else:  # a GPU without triton: the per-expert torch products run there (correct, not fast)
        dispatch.fallback(op, f"no Triton for {t.device.type} tensors: per-expert torch matrix products")


# ------------------------------------------------------------------------------------------- CPU (torch)


def _cdt(dtype: torch.dtype) -> torch.dtype:
    from .fused_moe import cpu_compute_dtype

    return cpu_compute_dtype(dtype)


class _Order:
    """The slots of ``ids [T, k]`` grouped by expert, from the registered permutation ops (``moe_sort``).

    ``sorted`` [T*k] int32 lists the slots expert by expert, ``inv`` [T*k] int32 is each slot's position in that
    order, ``ends`` [E] int32 where each expert's group ends (``torch._grouped_mm``'s ``offs``), ``counts`` the
    per-expert group sizes (a Python list, for the per-expert loops).
    ``rows(t)`` gathers the rows of a slot-ordered ``[T*k, ...]`` tensor into expert order, ``tokens(x)`` the rows
    of a token-ordered ``[T, H]`` one (``moe_permute``, a parallel row copy); ``back(ts)`` puts an expert-ordered
    tensor back in slot order (a gather by ``inv``, the same op with top_k = 1).
    """

    def __init__(self, ids: torch.Tensor, E: int):
        self.k = ids.shape[1]
        self.sorted, self.inv, offsets = moe_sort(ids.contiguous(), E)
        self.ends = offsets[1:]
        self.counts = offsets.diff().tolist()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return moe_permute(_rows_contiguous(x), self.sorted, self.k)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return moe_permute(_rows_contiguous(t), self.sorted, 1)

    def back(self, ts: torch.Tensor) -> torch.Tensor:
        return moe_permute(_rows_contiguous(ts), self.inv, 1)

    def chunks(self):
        """(expert, slice of the expert-ordered rows) for every expert that has rows."""
        start = 0
        for e, c in enumerate(self.counts):
            if c:
                yield e, slice(start, start + c)
            start += c


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) else t.contiguous()


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(dtype: torch.dtype) -> bool:
    """Whether this torch has a CPU ``torch._grouped_mm`` for ``dtype`` (a private op; probed once on a tiny case)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, b = torch.ones((16, 16), dtype=dtype), torch.ones((2, 16, 16), dtype=dtype)
        out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32))
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _grouped_mm_fits(*ts: torch.Tensor) -> bool:
    """``torch._grouped_mm`` applies to these operands: CPU tensors (a GPU without triton keeps the per-expert
    loop: CUDA's grouped GEMM has other requirements), its CPU kernel for their dtype exists, and every stride but
    the unit one, and each base address, is a multiple of 16 bytes (what it requires of 16-bit operands; every
    real Qwen3 shape has it, odd test shapes do not)."""
    if ts[0].device.type != "cpu" or not _grouped_mm_runs(ts[0].dtype):
        return False
    for t in ts:
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st, n in zip(t.stride(), t.shape) if st != 1 and n > 1):
            return False
    return True


def _expert_mm(a: torch.Tensor, w: torch.Tensor, order: _Order, transpose_w: bool) -> torch.Tensor:
    """Per expert e, its rows of ``a`` (expert order) times ``w[e].T`` (``transpose_w``) or ``w[e]``: ``[rows, N]``
    in the compute dtype. One ``torch._grouped_mm`` over all the experts when no dtype conversion is needed and it
    applies (the same products as the loop, bit for bit, without ~10 us of Python per expert: 1.05-1.1x on the
    block here), else one ``torch.mm`` per expert that has rows, converting only those experts' weights."""
    cdt = _cdt(a.dtype)
    wk = w.transpose(1, 2) if transpose_w else w  # [E, K, N]
    if cdt == a.dtype and _grouped_mm_fits(a, wk):
        return torch._grouped_mm(a, wk, offs=order.ends)
    out = a.new_empty((a.shape[0], wk.shape[2]), dtype=cdt)
    for e, sl in order.chunks():
        torch.mm(a[sl].to(cdt), wk[e].to(cdt), out=out[sl])
    return out


def _expert_wgrad(a: torch.Tensor, b: torch.Tensor, order: _Order, num_experts: int, dtype: torch.dtype):
    """Per expert e: ``a[rows of e].T @ b[rows of e]`` (both in expert order), ``[E, M, N]`` in ``dtype``; zero for
    an expert without rows. One ``torch._grouped_mm`` when it applies, else one product per expert."""
    if a.dtype == b.dtype and _cdt(a.dtype) == a.dtype and _grouped_mm_fits(a.t(), b):
        return torch._grouped_mm(a.t(), b, offs=order.ends).to(dtype)
    out = torch.zeros((num_experts, a.shape[1], b.shape[1]), dtype=dtype, device=a.device)
    for e, sl in order.chunks():
        out[e] = (a[sl].t() @ b[sl]).to(dtype)
    return out


def _rounded(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 routing weights rounded to the activations' dtype (and back to fp32), as the kernels use them."""
    return weights if dtype == torch.float32 else weights.to(dtype).float()


def _cpu_gate_up_sorted(x, w_gate_up, order, save):
    # Per expert: one GEMM over its contiguous (expert-ordered) rows, then SwiGLU in fp32 with one rounding (as the
    # Triton epilogue). Returns h (and gate_up when save) in expert order.
    I = w_gate_up.shape[1] // 2
    gu = _expert_mm(order.tokens(x), w_gate_up, order, transpose_w=True)
    hs = (F.silu(gu[:, :I].float()) * gu[:, I:].float()).to(x.dtype)
    return hs, (gu.to(x.dtype) if save else None)


def _cpu_gate_up(x, w_gate_up, ids, save):
    order = _Order(ids, w_gate_up.shape[0])
    hs, gus = _cpu_gate_up_sorted(x, w_gate_up, order, save)
    return order.back(hs), (order.back(gus) if save else x.new_empty((0, w_gate_up.shape[1])))


def _cpu_down_sorted(hs, w_down, order, weights):
    # hs: h in expert order. One GEMM per expert, then moe_unpermute: the k rows of each token straight from
    # expert order, weighted and summed in fp32 in the order j = 0..k-1 (as the Triton path); one rounding to h's
    # dtype at the end
    ys = _expert_mm(hs, w_down, order, transpose_w=True)
    return moe_unpermute(ys, _rounded(weights, hs.dtype), order.inv).to(hs.dtype)


def _cpu_down(h, w_down, ids, weights):
    order = _Order(ids, w_down.shape[0])
    return _cpu_down_sorted(order.rows(h), w_down, order, weights)


def _cpu_experts(x, w_gate_up, w_down, ids, weights, save):
    # one grouping of the slots for both GEMMs, and h stays in expert order between them (slot order only for
    # the backward)
    order = _Order(ids, w_gate_up.shape[0])
    hs, gus = _cpu_gate_up_sorted(x, w_gate_up, order, save)
    out = _cpu_down_sorted(hs, w_down, order, weights)
    if not save:
        return out, x.new_empty((0, hs.shape[1])), x.new_empty((0, w_gate_up.shape[1]))
    return out, order.back(hs), order.back(gus)


def _cpu_down_bwd_sorted(dout, hs, gus, w_down, order, weights, need_w):
    # hs, gus: the forward's h and gate_up in expert order. Returns d_gate_up in expert order, d_w_down, d_weights.
    E, H, I = w_down.shape
    T, k = weights.shape
    cdt = _cdt(hs.dtype)
    rw = _rounded(weights, hs.dtype).reshape(-1)[order.sorted.long()]  # [T*k] in expert order
    douts = order.tokens(dout)
    g = _expert_mm(douts, w_down, order, transpose_w=False)
    if need_w:
        scaled = (douts.float() * rw[:, None]).to(cdt)
        dwd = _expert_wgrad(scaled, hs.to(cdt), order, E, w_down.dtype)
    else:
        dwd = w_down.new_empty((0, H, I))
    gf = g.float()
    drw = (gf * hs.float()).sum(1)[order.inv.long()]
    gate, up = gus.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dh = gf * rw[:, None]
    dgus = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], 1).to(hs.dtype)
    return dgus, dwd, drw.view(T, k)


def _cpu_down_backward(dout, h, gate_up, w_down, ids, weights, need_w):
    order = _Order(ids, w_down.shape[0])
    dgus, dwd, drw = _cpu_down_bwd_sorted(dout, order.rows(h), order.rows(gate_up), w_down, order, weights, need_w)
    return order.back(dgus), dwd, drw


def _cpu_gate_up_bwd_sorted(dgus, x, w_gate_up, order, need_x, need_w):
    # dgus: d_gate_up in expert order. Returns dx (an empty [0, H] unless need_x) and d_w_gate_up.
    T, H = x.shape
    cdt = _cdt(x.dtype)
    if need_w:
        dwgu = _expert_wgrad(dgus.to(cdt), order.tokens(x).to(cdt), order, w_gate_up.shape[0], w_gate_up.dtype)
    else:
        dwgu = w_gate_up.new_empty((0,) + tuple(w_gate_up.shape[1:]))
    if not need_x:
        return x.new_empty((0, H)), dwgu
    dxs = _expert_mm(dgus, w_gate_up, order, transpose_w=False)
    return sum_slots(dxs, T, order.k, order.inv).to(x.dtype), dwgu


def _cpu_gate_up_backward(d_gate_up, x, w_gate_up, ids, need_w):
    order = _Order(ids, w_gate_up.shape[0])
    return _cpu_gate_up_bwd_sorted(order.rows(d_gate_up), x, w_gate_up, order, True, need_w)


def _cpu_backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dwgu, need_dwd):
    # one grouping of the slots for both halves; d_gate_up stays in expert order between them
    order = _Order(ids, w_gate_up.shape[0])
    dgus, dwd, drw = _cpu_down_bwd_sorted(dout, order.rows(h), order.rows(gate_up), w_down, order, weights, need_dwd)
    dx, dwgu = _cpu_gate_up_bwd_sorted(dgus, x, w_gate_up, order, need_dx, need_dwgu)  # nothing asked: no work
    return dx, dwgu, dwd, drw


def sum_slots(ys: torch.Tensor, T: int, k: int, inv: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j ys[inv[t*k + j]]`` ([T, H] in ys's dtype), for the CPU dx (ys in expert order).

    ``moe_unpermute`` with unit weights: the k rows accumulated in fp32 in the order j = 0..k-1 (``1.0 * v`` and
    the fp32 add are exact), then one rounding, so the sum is deterministic and independent of tiling; the Triton
    path's ``sum_slots`` kernel computes the same sum, bit for bit, over slot-ordered rows. Not
    ``ys.view(T, k, H).sum(1)``: torch's reduction order and accumulation dtype are implementation details."""
    return moe_unpermute(ys, torch.ones((T, k), dtype=torch.float32, device=ys.device), inv)


# ------------------------------------------------------------------------------------------ Triton path


def _align(ids, E, cfg, reuse=None):
    """``(padded_slots, block_expert, BLOCK_M)`` of ``ids`` for ``cfg``'s BLOCK_M: ``reuse`` (an earlier alignment
    of the same ids, from this module) when it has that block size, else a new ``moe_align_block``."""
    if reuse is not None and reuse[2] == cfg["BLOCK_M"]:
        return reuse
    padded, block_expert, _ = moe_align_block(ids, E, cfg["BLOCK_M"])
    return padded, block_expert, cfg["BLOCK_M"]


def _cfg(kernel: str, slots: int, dtype: torch.dtype, device: torch.device, shape: tuple) -> dict:
    """The launch config: the device's tuned table for exactly this kernel, dtype and ``shape = (H, I, E)`` if
    it has an entry, else the heuristic (``kernels.grouped_swiglu.default_config``)."""
    from ..kernels import grouped_swiglu as kern

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return kern.default_config(slots, kernel, kern.dtype_name(dtype), name, shape)


def _triton_gate_up(x, w_gate_up, ids, save):
    """``(h, gate_up or an empty [0, 2I], the alignment used)``."""
    from ..kernels import grouped_swiglu as kern

    T, H = x.shape
    E, I2 = w_gate_up.shape[0], w_gate_up.shape[1]
    k = ids.shape[1]
    cfg = _cfg("gate_up", T * k, x.dtype, x.device, (H, I2 // 2, E))
    align = _align(ids, E, cfg)
    h, gu = kern.gate_up(x.contiguous(), w_gate_up.contiguous(), align[0], align[1], k, cfg, store_gu=save)
    return h, (gu if save else x.new_empty((0, I2))), align


def _triton_down(h, w_down, ids, weights, reuse=None):
    from ..kernels import grouped_swiglu as kern

    E, H, I = w_down.shape
    T, k = weights.shape
    cfg = _cfg("down", T * k, h.dtype, h.device, (H, I, E))
    padded, be, _ = _align(ids, E, cfg, reuse)
    y = kern.down(h.contiguous(), w_down.contiguous(), weights, padded, be, cfg)  # [T*k, H] in h's dtype, weighted
    return kern.sum_slots(y, k)


def _triton_experts(x, w_gate_up, w_down, ids, weights, save):
    # gate_up's alignment serves down too when their configs share BLOCK_M (every heuristic phase does): one
    # moe_align_block (4 CUDA launches) per forward instead of two
    h, gu, align = _triton_gate_up(x, w_gate_up, ids, save)
    out = _triton_down(h, w_down, ids, weights, align)
    return out, (h if save else x.new_empty((0, h.shape[1]))), gu


def _triton_down_backward(dout, h, gate_up, w_down, ids, weights, need_w):
    """``(d_gate_up, d_w_down, d_weights, alignment, order)``: the alignment and the ``moe_sort`` result (None
    without the weight gradient) it used, for the gate/up part to reuse."""
    from ..kernels import grouped_swiglu as kern

    E, H, I = w_down.shape
    T, k = weights.shape
    dout, h, gate_up, w_down = (t.contiguous() for t in (dout, h, gate_up, w_down))
    cfg = _cfg("down_bwd", T * k, h.dtype, h.device, (H, I, E))
    align = _align(ids, E, cfg)
    dgu, drw = kern.down_bwd(dout, w_down, h, gate_up, weights, align[0], align[1], k, cfg)
    if not need_w:
        return dgu, w_down.new_empty((0, H, I)), drw, align, None
    order = moe_sort(ids, E)
    wcfg = _cfg("wgrad", T * k, h.dtype, h.device, (H, I, E))
    dwd = kern.wgrad(dout, h, weights, order[0], order[2], E, k, 1, wcfg)
    return dgu, dwd, drw, align, order


def _triton_gate_up_backward(d_gate_up, x, w_gate_up, ids, need_w, need_x=True, align=None, order=None):
    """``(dx or an empty [0, H], d_w_gate_up or an empty [0, 2I, H])``, reusing the down part's ``align`` (when its
    BLOCK_M fits) and ``order`` (``moe_sort`` of the same ids) when given."""
    from ..kernels import grouped_swiglu as kern

    T, H = x.shape
    E, I2 = w_gate_up.shape[0], w_gate_up.shape[1]
    k = ids.shape[1]
    d_gate_up, x, w_gate_up = (t.contiguous() for t in (d_gate_up, x, w_gate_up))
    dx = x.new_empty((0, H))
    if need_x:
        cfg = _cfg("dx", T * k, x.dtype, x.device, (H, I2 // 2, E))
        padded, be, _ = _align(ids, E, cfg, align)
        dx = kern.sum_slots(kern.dx(d_gate_up, w_gate_up, padded, be, cfg), k)  # per-slot rows in x's dtype, summed
    if not need_w:
        return dx, w_gate_up.new_empty((0,) + tuple(w_gate_up.shape[1:]))
    sorted_slots, _, offsets = order if order is not None else moe_sort(ids, E)
    wcfg = _cfg("wgrad", T * k, x.dtype, x.device, (H, I2 // 2, E))
    return dx, kern.wgrad(d_gate_up, x, None, sorted_slots, offsets, E, 1, k, wcfg)


def _triton_backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dwgu, need_dwd):
    # down_bwd's alignment serves dx when their configs share BLOCK_M, one moe_sort serves both weight gradients
    dgu, dwd, drw, align, order = _triton_down_backward(dout, h, gate_up, w_down, ids, weights, need_dwd)
    dx, dwgu = _triton_gate_up_backward(dgu, x, w_gate_up, ids, need_dwgu, need_dx, align, order)
    return dx, dwgu, dwd, drw


# ------------------------------------------------------------------------------------------------- ops


@torch.library.custom_op("qwen3moe::grouped_swiglu_gate_up", mutates_args=())
def grouped_swiglu_gate_up(
    x: torch.Tensor, w_gate_up: torch.Tensor, ids: torch.Tensor, save_gate_up: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, E, I, k = _check_gate_up("grouped_swiglu_gate_up", x, w_gate_up, ids)
    _record("grouped_swiglu_gate_up", x)
    if T == 0:
        return x.new_empty((0, I)), x.new_empty((0, 2 * I))
    if _use_triton(x):
        return _triton_gate_up(x, w_gate_up, ids, save_gate_up)[:2]
    return _cpu_gate_up(x, w_gate_up, ids, save_gate_up)


@grouped_swiglu_gate_up.register_fake
def _(x, w_gate_up, ids, save_gate_up):
    T, H, E, I, k = _check_gate_up("grouped_swiglu_gate_up", x, w_gate_up, ids)
    return x.new_empty((T * k, I)), x.new_empty((T * k if save_gate_up else 0, 2 * I))


@torch.library.custom_op("qwen3moe::grouped_swiglu_down", mutates_args=())
def grouped_swiglu_down(h: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    T, H, E, I, k = _check_down("grouped_swiglu_down", h, w_down, ids, weights)
    _record("grouped_swiglu_down", h)
    if T == 0:
        return h.new_empty((0, H))
    if _use_triton(h):
        return _triton_down(h, w_down, ids, weights)
    return _cpu_down(h, w_down, ids, weights)


@grouped_swiglu_down.register_fake
def _(h, w_down, ids, weights):
    T, H, E, I, k = _check_down("grouped_swiglu_down", h, w_down, ids, weights)
    return h.new_empty((T, H))


def _check_experts(op, x, w_gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_gate_up(op, x, w_gate_up, ids)
    _check_float(op, "w_down", w_down, x.dtype, x.device, 3)
    torch._check(tuple(w_down.shape) == (E, H, I),
                 lambda: f"{op}: w_down must be [E={E}, H={H}, I={I}] (from x and w_gate_up), got {tuple(w_down.shape)}")
    _check_weights(op, weights, T, k, x.device)
    return T, H, E, I, k


@torch.library.custom_op("qwen3moe::grouped_swiglu", mutates_args=())
def grouped_swiglu(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    save_activations: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, E, I, k = _check_experts("grouped_swiglu", x, w_gate_up, w_down, ids, weights)
    _record("grouped_swiglu", x)
    if T == 0:
        return x.new_empty((0, H)), x.new_empty((0, I)), x.new_empty((0, 2 * I))
    if _use_triton(x):
        return _triton_experts(x, w_gate_up, w_down, ids, weights, save_activations)
    return _cpu_experts(x, w_gate_up, w_down, ids, weights, save_activations)


@grouped_swiglu.register_fake
def _(x, w_gate_up, w_down, ids, weights, save_activations):
    T, H, E, I, k = _check_experts("grouped_swiglu", x, w_gate_up, w_down, ids, weights)
    rows = T * k if save_activations else 0
    return x.new_empty((T, H)), x.new_empty((rows, I)), x.new_empty((rows, 2 * I))


def _check_down_backward(op, dout, h, gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_down(op, h, w_down, ids, weights)
    _check_float(op, "dout", dout, h.dtype, h.device, 2)
    torch._check(tuple(dout.shape) == (T, H), lambda: f"{op}: dout must be [T={T}, H={H}], got {tuple(dout.shape)}")
    _check_float(op, "gate_up", gate_up, h.dtype, h.device, 2)
    torch._check(tuple(gate_up.shape) == (T * k, 2 * I),
                 lambda: f"{op}: gate_up must be [T*k={T * k}, 2I={2 * I}] (saved by the forward), got {tuple(gate_up.shape)}")
    return T, H, E, I, k


@torch.library.custom_op("qwen3moe::grouped_swiglu_down_backward", mutates_args=())
def grouped_swiglu_down_backward(
    dout: torch.Tensor, h: torch.Tensor, gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
    weights: torch.Tensor, need_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, E, I, k = _check_down_backward("grouped_swiglu_down_backward", dout, h, gate_up, w_down, ids, weights)
    _record("grouped_swiglu_down_backward", h)
    if T == 0:
        dwd = torch.zeros_like(w_down) if need_weight_grad else w_down.new_empty((0, H, I))
        return h.new_empty((0, 2 * I)), dwd, weights.new_empty((0, k))
    if _use_triton(h):
        return _triton_down_backward(dout, h, gate_up, w_down, ids, weights, need_weight_grad)[:3]
    return _cpu_down_backward(dout, h, gate_up, w_down, ids, weights, need_weight_grad)


@grouped_swiglu_down_backward.register_fake
def _(dout, h, gate_up, w_down, ids, weights, need_weight_grad=True):
    T, H, E, I, k = _check_down_backward("grouped_swiglu_down_backward", dout, h, gate_up, w_down, ids, weights)
    dwd = torch.empty_like(w_down) if need_weight_grad else w_down.new_empty((0, H, I))
    return h.new_empty((T * k, 2 * I)), dwd, weights.new_empty((T, k))


def _check_gate_up_backward(op, d_gate_up, x, w_gate_up, ids):
    T, H, E, I, k = _check_gate_up(op, x, w_gate_up, ids)
    _check_float(op, "d_gate_up", d_gate_up, x.dtype, x.device, 2)
    torch._check(tuple(d_gate_up.shape) == (T * k, 2 * I),
                 lambda: f"{op}: d_gate_up must be [T*k={T * k}, 2I={2 * I}], got {tuple(d_gate_up.shape)}")
    return T, H, E, I, k


@torch.library.custom_op("qwen3moe::grouped_swiglu_gate_up_backward", mutates_args=())
def grouped_swiglu_gate_up_backward(
    d_gate_up: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor, ids: torch.Tensor, need_weight_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, E, I, k = _check_gate_up_backward("grouped_swiglu_gate_up_backward", d_gate_up, x, w_gate_up, ids)
    _record("grouped_swiglu_gate_up_backward", x)
    if T == 0:
        dw = torch.zeros_like(w_gate_up) if need_weight_grad else w_gate_up.new_empty((0, 2 * I, H))
        return x.new_empty((0, H)), dw
    if _use_triton(x):
        return _triton_gate_up_backward(d_gate_up, x, w_gate_up, ids, need_weight_grad)
    return _cpu_gate_up_backward(d_gate_up, x, w_gate_up, ids, need_weight_grad)


@grouped_swiglu_gate_up_backward.register_fake
def _(d_gate_up, x, w_gate_up, ids, need_weight_grad=True):
    T, H, E, I, k = _check_gate_up_backward("grouped_swiglu_gate_up_backward", d_gate_up, x, w_gate_up, ids)
    dw = torch.empty_like(w_gate_up) if need_weight_grad else w_gate_up.new_empty((0, 2 * I, H))
    return torch.empty_like(x), dw


def _check_backward(op, dout, x, h, gate_up, w_gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_experts(op, x, w_gate_up, w_down, ids, weights)
    _check_down_backward(op, dout, h, gate_up, w_down, ids, weights)
    return T, H, E, I, k


@torch.library.custom_op("qwen3moe::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(
    dout: torch.Tensor, x: torch.Tensor, h: torch.Tensor, gate_up: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, need_dx: bool = True,
    need_dw_gate_up: bool = True, need_dw_down: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, E, I, k = _check_backward("grouped_swiglu_backward", dout, x, h, gate_up, w_gate_up, w_down, ids, weights)
    _record("grouped_swiglu_backward", x)
    if T == 0:
        dwgu = torch.zeros_like(w_gate_up) if need_dw_gate_up else w_gate_up.new_empty((0, 2 * I, H))
        dwd = torch.zeros_like(w_down) if need_dw_down else w_down.new_empty((0, H, I))
        return x.new_empty((0, H)), dwgu, dwd, weights.new_empty((0, k))
    impl = _triton_backward if _use_triton(x) else _cpu_backward
    return impl(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dw_gate_up, need_dw_down)


@grouped_swiglu_backward.register_fake
def _(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx=True, need_dw_gate_up=True, need_dw_down=True):
    T, H, E, I, k = _check_backward("grouped_swiglu_backward", dout, x, h, gate_up, w_gate_up, w_down, ids, weights)
    dwgu = torch.empty_like(w_gate_up) if need_dw_gate_up else w_gate_up.new_empty((0, 2 * I, H))
    dwd = torch.empty_like(w_down) if need_dw_down else w_down.new_empty((0, H, I))
    return x.new_empty((T if need_dx else 0, H)), dwgu, dwd, weights.new_empty((T, k))
