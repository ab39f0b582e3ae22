"""The experts on CPU in torch: per-expert matrix products around the registered permutation ops.

``moe_sort`` groups the slots by expert, ``moe_permute`` gathers rows into expert order (and back by ``inv``),
``moe_unpermute`` does the fp32 weighted combine; the products run as one ``torch._grouped_mm`` over all experts
where its stride rules allow (every real Qwen3 shape), else one ``torch.mm`` per expert that has rows. bf16 computes
in fp32 on CPUs without native bf16 dot products (``cpu.cpu_compute_dtype``). Also the implementation on devices
without Triton. Layouts and semantics: ``ops/grouped_swiglu.py``; method: ``docs/ops/grouped_swiglu.md``.
"""

from __future__ import annotations

import functools

import torch

from ..cpu import cpu_compute_dtype
from ..reference import ACTIVATIONS
from .moe_permute import moe_permute, moe_sort, moe_unpermute, sum_slots


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


def grouped_mm_fits(*ts: torch.Tensor) -> bool:
    """``torch._grouped_mm`` applies to these operands: CPU tensors (a GPU without triton keeps the per-expert
    loop: CUDA's grouped GEMM has other requirements), its CPU kernel for their dtype exists, each base address is a
    multiple of 16 bytes, and the strides pass its check (every real Qwen3 shape does, odd test shapes do not)."""
    if ts[0].device.type != "cpu" or not _grouped_mm_runs(ts[0].dtype):
        return False
    return all(t.data_ptr() % 16 == 0 and _grouped_mm_strides_ok(t) for t in ts)


def _grouped_mm_strides_ok(t: torch.Tensor) -> bool:
    """torch's own rule (``check_valid_strides_and_return_transposed`` in ATen/native/GroupedMMUtils.h) for the last
    two dims: one has stride 1, the other a stride that spans it and is a multiple of 16 bytes. It looks at the
    strides of size-1 dims too ([S, 1] or [E, 1, 1] operands fail it); earlier dims: 16-byte strides where the size
    is over 1 (CUDA's rule, kept on CPU too: every real shape has them)."""
    es = t.element_size()
    (r, c), (sr, sc) = t.shape[-2:], t.stride()[-2:]
    if sr == 1 and sc >= max(1, r):
        inner_ok = (sc * es) % 16 == 0
    elif sc == 1 and sr >= max(1, c):
        inner_ok = (sr * es) % 16 == 0
    else:
        inner_ok = False
    return inner_ok and not any((st * es) % 16 for st, n in zip(t.stride()[:-2], t.shape[:-2]) if n > 1)


def _expert_mm(a: torch.Tensor, w: torch.Tensor, order: _Order, transpose_w: bool) -> torch.Tensor:
    """Per expert e, its rows of ``a`` (expert order) times ``w[e].T`` (``transpose_w``) or ``w[e]``: ``[rows, N]``
    in the compute dtype. One ``torch._grouped_mm`` over all the experts when no dtype conversion is needed and it
    applies (the same products as the loop, bit for bit, without ~10 us of Python per expert: 1.05-1.1x on the
    block here), else one ``torch.mm`` per expert that has rows, converting only those experts' weights."""
    cdt = cpu_compute_dtype(a.dtype)
    wk = w.transpose(1, 2) if transpose_w else w  # [E, K, N]
    if cdt == a.dtype and grouped_mm_fits(a, wk):
        return torch._grouped_mm(a, wk, offs=order.ends)
    out = a.new_empty((a.shape[0], wk.shape[2]), dtype=cdt)
    for e, sl in order.chunks():
        torch.mm(a[sl].to(cdt), wk[e].to(cdt), out=out[sl])
    return out


def _expert_wgrad(a: torch.Tensor, b: torch.Tensor, order: _Order, num_experts: int, dtype: torch.dtype):
    """Per expert e: ``a[rows of e].T @ b[rows of e]`` (both in expert order), ``[E, M, N]`` in ``dtype``; zero for
    an expert without rows. One ``torch._grouped_mm`` when it applies, else one product per expert."""
    if a.dtype == b.dtype and cpu_compute_dtype(a.dtype) == a.dtype and grouped_mm_fits(a.t(), b):
        return torch._grouped_mm(a.t(), b, offs=order.ends).to(dtype)
    out = torch.zeros((num_experts, a.shape[1], b.shape[1]), dtype=dtype, device=a.device)
    for e, sl in order.chunks():
        out[e] = (a[sl].t() @ b[sl]).to(dtype)
    return out


def _rounded(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 routing weights rounded to the activations' dtype (and back to fp32), as the kernels use them."""
    return weights if dtype == torch.float32 else weights.to(dtype).float()


_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_C = 0.044715


def activation_grad(activation: str, gate: torch.Tensor) -> torch.Tensor:
    """d act(gate) / d gate for fp32 ``gate`` (what the Triton backward epilogue computes)."""
    if activation == "silu":
        sig = torch.sigmoid(gate)
        return sig * (1 + gate * (1 - sig))
    if activation == "gelu":  # Phi(g) + g * phi(g), the standard normal's CDF and density
        cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
        return cdf + gate * torch.exp(-0.5 * gate * gate) * 0.3989422804014327
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (gate + _GELU_TANH_C * gate * gate * gate))
        return 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * gate * gate)
    if activation == "relu":
        return (gate > 0).to(gate.dtype)
    raise ValueError(f"no gradient for activation {activation!r}")


def _gate_up_sorted(x, w_gate_up, order, save, activation):
    # Per expert: one GEMM over its contiguous (expert-ordered) rows, then act(gate) * up in fp32 with one rounding
    # (as the Triton epilogue). Returns h (and gate_up when save) in expert order.
    I = w_gate_up.shape[1] // 2
    gu = _expert_mm(order.tokens(x), w_gate_up, order, transpose_w=True)
    hs = (ACTIVATIONS[activation](gu[:, :I].float()) * gu[:, I:].float()).to(x.dtype)
    return hs, (gu.to(x.dtype) if save else None)


def gate_up(x, w_gate_up, ids, save, activation="silu"):
    order = _Order(ids, w_gate_up.shape[0])
    hs, gus = _gate_up_sorted(x, w_gate_up, order, save, activation)
    return order.back(hs), (order.back(gus) if save else x.new_empty((0, w_gate_up.shape[1])))


def _down_sorted(hs, w_down, order, weights):
    # hs: h in expert order. One GEMM per expert, then moe_unpermute: the k rows of each token straight from
    # expert order, weighted and summed in fp32 in the order j = 0..k-1 (as the Triton path); one rounding to h's
    # dtype at the end
    ys = _expert_mm(hs, w_down, order, transpose_w=True)
    return moe_unpermute(ys, _rounded(weights, hs.dtype), order.inv).to(hs.dtype)


def down(h, w_down, ids, weights):
    order = _Order(ids, w_down.shape[0])
    return _down_sorted(order.rows(h), w_down, order, weights)


def experts(x, w_gate_up, w_down, ids, weights, save, activation="silu"):
    # one grouping of the slots for both GEMMs, and h stays in expert order between them (slot order only for
    # the backward)
    order = _Order(ids, w_gate_up.shape[0])
    hs, gus = _gate_up_sorted(x, w_gate_up, order, save, activation)
    out = _down_sorted(hs, w_down, order, weights)
    if not save:
        return out, x.new_empty((0, hs.shape[1])), x.new_empty((0, w_gate_up.shape[1]))
    return out, order.back(hs), order.back(gus)


def _down_bwd_sorted(dout, hs, gus, w_down, order, weights, need_w, activation):
    # hs, gus: the forward's h and gate_up in expert order. Returns d_gate_up in expert order, d_w_down, d_weights.
    E, H, I = w_down.shape
    T, k = weights.shape
    cdt = cpu_compute_dtype(hs.dtype)
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
    dh = gf * rw[:, None]
    dgate = dh * up * activation_grad(activation, gate)
    dgus = torch.cat([dgate, dh * ACTIVATIONS[activation](gate)], 1).to(hs.dtype)
    return dgus, dwd, drw.view(T, k)


def down_backward(dout, h, gate_up, w_down, ids, weights, need_w, activation="silu"):
    order = _Order(ids, w_down.shape[0])
    dgus, dwd, drw = _down_bwd_sorted(dout, order.rows(h), order.rows(gate_up), w_down, order, weights, need_w,
                                      activation)
    return order.back(dgus), dwd, drw


def _gate_up_bwd_sorted(dgus, x, w_gate_up, order, need_x, need_w):
    # dgus: d_gate_up in expert order. Returns dx (an empty [0, H] unless need_x) and d_w_gate_up.
    T, H = x.shape
    cdt = cpu_compute_dtype(x.dtype)
    if need_w:
        dwgu = _expert_wgrad(dgus.to(cdt), order.tokens(x).to(cdt), order, w_gate_up.shape[0], w_gate_up.dtype)
    else:
        dwgu = w_gate_up.new_empty((0,) + tuple(w_gate_up.shape[1:]))
    if not need_x:
        return x.new_empty((0, H)), dwgu
    dxs = _expert_mm(dgus, w_gate_up, order, transpose_w=False)
    return sum_slots(dxs, T, order.k, order.inv).to(x.dtype), dwgu


def gate_up_backward(d_gate_up, x, w_gate_up, ids, need_w):
    order = _Order(ids, w_gate_up.shape[0])
    return _gate_up_bwd_sorted(order.rows(d_gate_up), x, w_gate_up, order, True, need_w)


def backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dwgu, need_dwd, activation="silu"):
    # one grouping of the slots for both halves; d_gate_up stays in expert order between them
    order = _Order(ids, w_gate_up.shape[0])
    dgus, dwd, drw = _down_bwd_sorted(dout, order.rows(h), order.rows(gate_up), w_down, order, weights, need_dwd,
                                      activation)
    dx, dwgu = _gate_up_bwd_sorted(dgus, x, w_gate_up, order, need_dx, need_dwgu)  # nothing asked: no work
    return dx, dwgu, dwd, drw
