"""The experts as ops: ``torch.ops.qwen3moe.grouped_swiglu`` (forward) and ``grouped_swiglu_backward``, their parts
``grouped_swiglu_{gate_up, down, down_backward, gate_up_backward}``, and the public, differentiable ``moe_experts``.

Slot ``s = t*k + j`` is token t's j-th choice ``e = ids[t, j]``; x ``[T, H]``, w_gate_up ``[E, 2I, H]`` (gate rows
first), w_down ``[E, H, I]``, ids ``[T, k]`` int32/int64, weights ``[T, k]`` fp32 (rounded to x's dtype before use,
as transformers does). ``grouped_swiglu(x, w_gate_up, w_down, ids, weights, save_activations, activation="silu")
-> (out [T, H], h [T*k, I], gate_up [T*k, 2I])``: ``out[t] = sum_j weights[t, j] * (act(gate) * up)[s] @ w_down[e].T``
(act: silu, gelu, gelu_tanh or relu), the k slots summed in fp32 in the order j = 0..k-1 (deterministic); h and
gate_up (slot order) only when ``save_activations`` (the backward's inputs), else empty. A gradient not asked of the
backward comes back empty ``[0, ...]``.
Implementations: CUDA ``ops/grouped_swiglu_triton.py``; CPU: the forward ``grouped_swiglu`` is C++
(``csrc/grouped_swiglu_cpu.cpp``, per-ISA kernels chosen at run time; ``cpu_experts_impl`` names the path), the
parts and the backward ops ``ops/grouped_swiglu_cpu.py`` (torch; also the forward's reference in the tests). Each
part's semantics, the algorithms and rounding: ``docs/ops/grouped_swiglu.md``.
"""

from __future__ import annotations

import platform

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .. import _ext, reference
from ..recorder import fallback, record
from . import grouped_swiglu_cpu as _torch_impl
from ._checks import FLOAT_DTYPES, check, check_device, check_dtype, check_like

_IDS = (torch.int32, torch.int64)
ACTIVATIONS = tuple(reference.ACTIVATIONS)  # the gate's activations the kernels compute: silu, gelu, gelu_tanh, relu


# ------------------------------------------------------------------------------------------------ checks


def _check_ids(op: str, ids: torch.Tensor, T, E, device) -> None:
    """ids [T, k] int32/int64 with 1 <= k <= E; values in [0, E) (checked on CPU; a CUDA check would need a
    host sync, so there moe_align_block's device-side assertion reports them)."""
    check_dtype(op, "ids", ids, _IDS)
    check_device(op, "ids", ids, device)
    check(op, ids.dim() == 2 and ids.shape[0] == T, lambda: f"ids must be [T={T}, top_k], got {list(ids.shape)}")
    k = ids.shape[1]
    check(op, 1 <= k <= E, lambda: f"top_k (ids.shape[1]) must be in [1, E={E}], got {k}")
    # the values need a device-to-host read: eagerly on CPU only (a traced graph checks them when the op runs)
    tracing = isinstance(ids, FakeTensor) or torch.compiler.is_compiling()
    if ids.device.type == "cpu" and ids.numel() and not tracing:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            pos = [int(i) for i in (ids == bad).nonzero()[0]]
            raise ValueError(f"{op}: ids{pos} = {bad} is not an expert id in [0, E={E})")


def _check_weights(op, weights, T, k, device):
    check_dtype(op, "weights", weights, (torch.float32,))
    check_device(op, "weights", weights, device)
    check(op, tuple(weights.shape) == (T, k), lambda: f"weights must be [T={T}, k={k}], got {list(weights.shape)}")


def _check_2d(op, name, t, like=None, like_name="x"):
    if like is None:
        check_dtype(op, name, t)
    else:
        check_like(op, name, t, like, like_name)
    check(op, t.dim() == 2, lambda: f"{name} must be 2-D, got shape {list(t.shape)}")


def _check_gate_up(op, x, w_gate_up, ids):
    _check_2d(op, "x", x)
    T, H = x.shape
    check_like(op, "w_gate_up", w_gate_up, x, "x")
    check(op, w_gate_up.dim() == 3 and w_gate_up.shape[2] == H and w_gate_up.shape[1] % 2 == 0
          and w_gate_up.shape[1] > 0, lambda: f"w_gate_up must be [E, 2I, H={H}], got {list(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    _check_ids(op, ids, T, E, x.device)
    return T, H, E, I, ids.shape[1]


def _check_down(op, h, w_down, ids, weights):
    _check_2d(op, "h", h)
    check_like(op, "w_down", w_down, h, "h")
    check(op, w_down.dim() == 3, lambda: f"w_down must be [E, H, I], got {list(w_down.shape)}")
    E, H, I = w_down.shape
    check(op, h.shape[1] == I, lambda: f"h must be [T*k, I={I}] (w_down is [E, H, I]), got {list(h.shape)}")
    check(op, weights.dim() == 2, lambda: f"weights must be [T, k], got shape {list(weights.shape)}")
    T = weights.shape[0]
    _check_ids(op, ids, T, E, h.device)
    k = ids.shape[1]
    _check_weights(op, weights, T, k, h.device)
    check(op, h.shape[0] == T * k, lambda: f"h must have T*k = {T * k} rows, got {h.shape[0]}")
    return T, H, E, I, k


def _check_experts(op, x, w_gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_gate_up(op, x, w_gate_up, ids)
    check_like(op, "w_down", w_down, x, "x")
    check(op, tuple(w_down.shape) == (E, H, I),
          lambda: f"w_down must be [E={E}, H={H}, I={I}] (from x and w_gate_up), got {list(w_down.shape)}")
    _check_weights(op, weights, T, k, x.device)
    return T, H, E, I, k


def _check_down_backward(op, dout, h, gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_down(op, h, w_down, ids, weights)
    _check_2d(op, "dout", dout, h, "h")
    check(op, tuple(dout.shape) == (T, H), lambda: f"dout must be [T={T}, H={H}], got {list(dout.shape)}")
    _check_2d(op, "gate_up", gate_up, h, "h")
    check(op, tuple(gate_up.shape) == (T * k, 2 * I),
          lambda: f"gate_up must be [T*k={T * k}, 2I={2 * I}] (saved by the forward), got {list(gate_up.shape)}")
    return T, H, E, I, k


def _check_gate_up_backward(op, d_gate_up, x, w_gate_up, ids):
    T, H, E, I, k = _check_gate_up(op, x, w_gate_up, ids)
    _check_2d(op, "d_gate_up", d_gate_up, x)
    check(op, tuple(d_gate_up.shape) == (T * k, 2 * I),
          lambda: f"d_gate_up must be [T*k={T * k}, 2I={2 * I}], got {list(d_gate_up.shape)}")
    return T, H, E, I, k


def _check_backward(op, dout, x, h, gate_up, w_gate_up, w_down, ids, weights):
    T, H, E, I, k = _check_experts(op, x, w_gate_up, w_down, ids, weights)
    _check_down_backward(op, dout, h, gate_up, w_down, ids, weights)
    return T, H, E, I, k


def _check_activation(op: str, activation: str) -> None:
    check(op, activation in ACTIVATIONS, lambda: f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ---------------------------------------------------------------------------------- kernels and fakes
#
# One body per op, shared by its CPU and CUDA kernels: the checks, empty inputs, then the implementation module
# (``ops/grouped_swiglu_cpu.py`` or ``ops/grouped_swiglu_triton.py``). The schemas are in csrc/ops.cpp.


def _gate_up(op, impl, x, w_gate_up, ids, save_gate_up, activation="silu"):
    T, H, E, I, k = _check_gate_up(op, x, w_gate_up, ids)
    _check_activation(op, activation)
    if T == 0:
        return x.new_empty((0, I)), x.new_empty((0, 2 * I))
    return impl.gate_up(x, w_gate_up, ids, save_gate_up, activation)[:2]


def _down(op, impl, h, w_down, ids, weights):
    T, H, E, I, k = _check_down(op, h, w_down, ids, weights)
    if T == 0:
        return h.new_empty((0, H))
    return impl.down(h, w_down, ids, weights)


def _experts(op, impl, x, w_gate_up, w_down, ids, weights, save_activations, activation="silu"):
    T, H, E, I, k = _check_experts(op, x, w_gate_up, w_down, ids, weights)
    _check_activation(op, activation)
    if T == 0:
        return x.new_empty((0, H)), x.new_empty((0, I)), x.new_empty((0, 2 * I))
    return impl.experts(x, w_gate_up, w_down, ids, weights, save_activations, activation)


def _down_backward(op, impl, dout, h, gate_up, w_down, ids, weights, need_weight_grad=True, activation="silu"):
    T, H, E, I, k = _check_down_backward(op, dout, h, gate_up, w_down, ids, weights)
    _check_activation(op, activation)
    if T == 0:
        dwd = torch.zeros_like(w_down) if need_weight_grad else w_down.new_empty((0, H, I))
        return h.new_empty((0, 2 * I)), dwd, weights.new_empty((0, k))
    return impl.down_backward(dout, h, gate_up, w_down, ids, weights, need_weight_grad, activation)[:3]


def _gate_up_backward(op, impl, d_gate_up, x, w_gate_up, ids, need_weight_grad=True):
    T, H, E, I, k = _check_gate_up_backward(op, d_gate_up, x, w_gate_up, ids)
    if T == 0:
        dw = torch.zeros_like(w_gate_up) if need_weight_grad else w_gate_up.new_empty((0, 2 * I, H))
        return x.new_empty((0, H)), dw
    return impl.gate_up_backward(d_gate_up, x, w_gate_up, ids, need_weight_grad)[:2]


def _backward(op, impl, dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx=True, need_dw_gate_up=True,
              need_dw_down=True, activation="silu"):
    T, H, E, I, k = _check_backward(op, dout, x, h, gate_up, w_gate_up, w_down, ids, weights)
    _check_activation(op, activation)
    if T == 0:
        dwgu = torch.zeros_like(w_gate_up) if need_dw_gate_up else w_gate_up.new_empty((0, 2 * I, H))
        dwd = torch.zeros_like(w_down) if need_dw_down else w_down.new_empty((0, H, I))
        return x.new_empty((0, H)), dwgu, dwd, weights.new_empty((0, k))
    return impl.backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dw_gate_up, need_dw_down,
                         activation)


BODIES = {"grouped_swiglu_gate_up": _gate_up, "grouped_swiglu_down": _down, "grouped_swiglu": _experts,
          "grouped_swiglu_down_backward": _down_backward, "grouped_swiglu_gate_up_backward": _gate_up_backward,
          "grouped_swiglu_backward": _backward}


def _cpu(op: str):
    record(op, "cpu")
    return _torch_impl


def _cuda(op: str):
    if _ext.HAS_TRITON:
        from . import grouped_swiglu_triton

        record(op, "triton")
        return grouped_swiglu_triton
    fallback(op, "triton is not installed: per-expert torch matrix products on the GPU")
    return _torch_impl


def _register(op: str, body) -> None:
    def cpu_kernel(*args):
        return body(op, _cpu(op), *args)

    def cuda_kernel(*args):
        return body(op, _cuda(op), *args)

    if not (op == "grouped_swiglu" and _ext.CPU_EXPERTS):  # the forward's CPU kernel is C++ where it was built
        torch.library.register_kernel(f"qwen3moe::{op}", "cpu", cpu_kernel)
    torch.library.register_kernel(f"qwen3moe::{op}", "cuda", cuda_kernel)


def cpu_experts_impl() -> str:
    """What the CPU experts forward runs, as ``implementations()`` records it: ``"cpu (avx512_bf16)"`` (the C++
    kernel and its ISA path: avx512_bf16, avx512, avx2 or generic), or ``"cpu (torch: why)"`` where the torch
    implementation runs (no C++ kernel, a CPU without AVX2/FMA/F16C, or ``QWEN3MOE_CPU_ISA=torch``). A
    ``QWEN3MOE_CPU_ISA`` the CPU cannot run is a ValueError."""
    isa = _ext.cpu_isa()
    if isa is not None:
        return f"cpu ({isa})"
    return f"cpu (torch: no C++ experts kernel for {platform.machine() or 'this architecture'})"


class _FakeImpl:
    """What the implementations return, as empty tensors of the right shapes (the fakes' implementation)."""

    @staticmethod
    def gate_up(x, w_gate_up, ids, save, activation):
        S, I = x.shape[0] * ids.shape[1], w_gate_up.shape[1] // 2
        return x.new_empty((S, I)), x.new_empty((S if save else 0, 2 * I))

    @staticmethod
    def down(h, w_down, ids, weights):
        return h.new_empty((weights.shape[0], w_down.shape[1]))

    @staticmethod
    def experts(x, w_gate_up, w_down, ids, weights, save, activation):
        h, gu = _FakeImpl.gate_up(x, w_gate_up, ids, save, activation)
        return x.new_empty(x.shape), (h if save else h[:0]), gu

    @staticmethod
    def down_backward(dout, h, gate_up, w_down, ids, weights, need_w, activation):
        dwd = torch.empty_like(w_down) if need_w else w_down.new_empty((0,) + tuple(w_down.shape[1:]))
        return torch.empty_like(gate_up), dwd, weights.new_empty(weights.shape)

    @staticmethod
    def gate_up_backward(d_gate_up, x, w_gate_up, ids, need_w):
        dw = torch.empty_like(w_gate_up) if need_w else w_gate_up.new_empty((0,) + tuple(w_gate_up.shape[1:]))
        return torch.empty_like(x), dw

    @staticmethod
    def backward(dout, x, h, gate_up, w_gate_up, w_down, ids, weights, need_dx, need_dwgu, need_dwd, activation):
        dx = torch.empty_like(x) if need_dx else x.new_empty((0, x.shape[1]))
        dwgu = _FakeImpl.gate_up_backward(None, x, w_gate_up, ids, need_dwgu)[1]
        dwd = _FakeImpl.down_backward(None, h, gate_up, w_down, ids, weights, need_dwd, activation)[1]
        return dx, dwgu, dwd, weights.new_empty(weights.shape)


if _ext.AVAILABLE:
    for _op, _body in BODIES.items():
        _register(_op, _body)
        torch.library.register_fake(f"qwen3moe::{_op}")(
            lambda *args, _op=_op, _body=_body: _body(_op, _FakeImpl, *args))


# ------------------------------------------------------------------------------------------- moe_experts


class _MoeExperts(torch.autograd.Function):
    """The registered forward op, keeping what the registered backward op needs."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, ids, weights, activation):
        out, h, gu = torch.ops.qwen3moe.grouped_swiglu(x, w_gate_up, w_down, ids, weights, True, activation)
        ctx.save_for_backward(x, w_gate_up, w_down, ids, weights, h, gu)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_gate_up, w_down, ids, weights, h, gu = ctx.saved_tensors
        need_x, need_wgu, need_wd, _, need_rw, _ = ctx.needs_input_grad
        # frozen experts: their weight gradients (a third of the backward's GEMM work) are skipped
        dx, dwgu, dwd, drw = torch.ops.qwen3moe.grouped_swiglu_backward(
            dout.contiguous(), x, h, gu, w_gate_up, w_down, ids, weights, need_x, need_wgu, need_wd, ctx.activation)
        return (dx if need_x else None, dwgu if need_wgu else None, dwd if need_wd else None, None,
                drw if need_rw else None, None)


def _check_moe_experts(x, w_gate_up, w_down, ids, weights) -> None:
    """The shapes and devices any experts computation needs (ValueError; wrong-dtype ids TypeError)."""
    op = "moe_experts"
    check(op, x.dim() == 2, lambda: f"x must be [T, H], got shape {list(x.shape)}")
    T, H = x.shape
    check(op, w_gate_up.dim() == 3 and w_gate_up.shape[2] == H and w_gate_up.shape[1] % 2 == 0
          and w_gate_up.shape[1] > 0, lambda: f"w_gate_up must be [E, 2I, H={H}], got {list(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    check(op, tuple(w_down.shape) == (E, H, I), lambda: f"w_down must be [{E}, {H}, {I}], got {list(w_down.shape)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_like(op, name, t, x, "x")  # a mixed-dtype matmul is an error in torch (and transformers) too
    check_device(op, "weights", weights, x.device)
    if not weights.is_floating_point():
        raise TypeError(f"{op}: weights must be a float tensor, got {weights.dtype}")
    check(op, tuple(weights.shape) == tuple(ids.shape), lambda: f"weights must have ids' shape {list(ids.shape)}, "
                                                                f"got {list(weights.shape)}")
    _check_ids(op, ids, T, E, x.device)


def _no_kernel(x: torch.Tensor, activation) -> str | None:
    """Why no kernel takes these (valid) experts inputs, or None."""
    if not _ext.AVAILABLE or x.device.type not in ("cpu", "cuda"):
        return _ext.no_kernel_reason(x.device)
    if x.dtype not in FLOAT_DTYPES:
        return f"the kernels take fp32/fp16/bf16, got {x.dtype}"
    if activation not in ACTIVATIONS:
        return f"the kernels compute the activations {ACTIVATIONS}, not {getattr(activation, '__name__', activation)!r}"
    return None


def moe_experts(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    activation="silu",
) -> torch.Tensor:
    """The routed experts, ``[T, H]`` in x's dtype: ``out[t] = sum_j weights[t, j] * expert_e(x[t])`` with
    ``expert_e(x) = (act(x @ gate_e.T) * (x @ up_e.T)) @ w_down[e].T``, ``e = ids[t, j]`` (``reference.moe_experts``).
    Differentiable in x, w_gate_up, w_down and weights.

    x [T, H]; w_gate_up [E, 2I, H] (gate rows first) and w_down [E, H, I] in x's dtype; ids [T, k] int32/int64 in
    [0, E); weights [T, k] float (rounded to x's dtype first, as transformers does). ``activation``: "silu" (SwiGLU),
    "gelu", "gelu_tanh" or "relu" run the kernels; any other callable (transformers' ``act_fn``), another float dtype
    or a device without kernels runs the reference, visibly.
    """
    _check_moe_experts(x, w_gate_up, w_down, ids, weights)
    if isinstance(activation, str):
        check("moe_experts", activation in ACTIVATIONS,
              lambda: f"activation must be one of {ACTIVATIONS} or a callable, got {activation!r}")
    reason = _no_kernel(x, activation)
    if reason is not None:
        fallback("moe_experts", reason)
        return reference.moe_experts(x, w_gate_up, w_down, ids, weights, activation)
    if not torch.compiler.is_compiling():
        if x.device.type == "cpu":  # the forward op's C++ kernel cannot record itself: this wrapper does
            impl = cpu_experts_impl()
            record("grouped_swiglu", impl)
        else:
            impl = "triton" if x.is_cuda and _ext.HAS_TRITON else x.device.type
        record("moe_experts", impl)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate_up, w_down)):
        # the rounding in autograd too: the weights' gradient is the rounding's (as in the reference)
        return _MoeExperts.apply(x, w_gate_up, w_down, ids, weights.to(x.dtype).float(), activation)
    # no gradient: the op rounds the fp32 router weights itself (in the down kernel on CUDA: no cast launches)
    weights = weights if weights.dtype == torch.float32 else weights.float()  # exact from fp16/bf16
    return torch.ops.qwen3moe.grouped_swiglu(x, w_gate_up, w_down, ids, weights, False, activation)[0]
