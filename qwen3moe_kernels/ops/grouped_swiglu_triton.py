"""The experts on CUDA: the Triton kernels of ``kernels/grouped_swiglu.py`` over ``moe_align_block`` / ``moe_sort``
orders, launched so that one forward (or backward) groups the slots once where the configs allow.

Forward: align, gate_up, down, sum_slots (gate_up's alignment reused by down when their BLOCK_M match). Backward:
align, down_bwd, moe_sort, wgrad (dW_down), dx, sum_slots, wgrad (dW_gate_up), the alignment reused by dx and one
``moe_sort`` for both weight gradients. Layouts and semantics: ``ops/grouped_swiglu.py``; the kernels and their
configs: ``docs/ops/grouped_swiglu.md``. Imports triton (the op module imports this on the first CUDA call).
"""

from __future__ import annotations

import torch

from ..kernels import grouped_swiglu as kern
from .moe_permute import moe_align_block, moe_sort


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return kern.default_config(slots, kernel, kern.dtype_name(dtype), name, shape)


def gate_up(x, w_gate_up, ids, save, activation="silu"):
    """``(h, gate_up or an empty [0, 2I], the alignment used)``."""
    T, H = x.shape
    E, I2 = w_gate_up.shape[0], w_gate_up.shape[1]
    k = ids.shape[1]
    cfg = _cfg("gate_up", T * k, x.dtype, x.device, (H, I2 // 2, E))
    align = _align(ids, E, cfg)
    h, gu = kern.gate_up(x.contiguous(), w_gate_up.contiguous(), align[0], align[1], k, cfg, store_gu=save,
                         activation=activation)
    return h, (gu if save else x.new_empty((0, I2))), align


def down(h, w_down, ids, weights, reuse=None):
    E, H, I = w_down.shape
    T, k = weights.shape
    cfg = _cfg("down", T * k, h.dtype, h.device, (H, I, E))
    padded, be, _ = _align(ids, E, cfg, reuse)
    y = kern.down(h.contiguous(), w_down.contiguous(), weights, padded, be, cfg)  # [T*k, H] in h's dtype, weighted
    return kern.sum_slots(y, k)


def experts(x, w_gate_up, w_down, ids, weights, save, activation="silu"):
    # gate_up's alignment serves down too when their configs share BLOCK_M (every heuristic phase does): one
    # moe_align_block (4 CUDA launches) per forward instead of two
    h, gu, align = gate_up(x, w_gate_up, ids, save, activation)
    out = down(h, w_down, ids, weights, align)
    return out, (h if save else x.new_empty((0, h.shape[1]))), gu


def down_backward(dout, h, gate_up, w_down, ids, weights, need_w, activation="silu"):
    """``(d_gate_up, d_w_down, d_weights, alignment, order)``: the alignment and the ``moe_sort`` result (None
    without the weight gradient) it used, for the gate/up part to reuse."""
    E, H, I = w_down.shape
    T, k = weights.shape
    dout, h, gate_up, w_down = (t.contiguous() for t in (dout, h, gate_up, w_down))
    cfg = _cfg("down_bwd", T * k, h.dtype, h.device, (H, I, E))
    align = _align(ids, E, cfg)
    dgu, drw = kern.down_bwd(dout, w_down, h, gate_up, weights, align[0], align[1], k, cfg, activation=activation)
    if not need_w:
        return dgu, w_down.new_empty((0, H, I)), drw, align, None
    order = moe_sort(ids, E)
    wcfg = _cfg("wgrad", T * k, h.dtype, h.device, (H, I, E))
    dwd = kern.wgrad(dout, h, weights, order[0], order[2], E, k, 1, wcfg)
    return dgu, dwd, drw, align, order


def gate_up_backward(d_gate_up, x, w_gate_up, ids, need_w, need_x=True, align=None, order=None):
    """``(dx or an empty [0, H], d_w_gate_up or an empty [0, 2I, H])``, reusing the down part's ``align`` (when its
    BLOCK_M fits) and ``order`` (``moe_sort`` of the same ids) when given."""
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


def backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dwgu, need_dwd, activation="silu"):
    # down_bwd's alignment serves dx when their configs share BLOCK_M, one moe_sort serves both weight gradients
    dgu, dwd, drw, align, order = down_backward(dout, h, gate_up, w_down, ids, weights, need_dwd, activation)
    dx, dwgu = gate_up_backward(dgu, x, w_gate_up, ids, need_dwgu, need_dx, align, order)
    return dx, dwgu, dwd, drw
