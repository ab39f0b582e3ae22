"""Public ops: rotate-half RoPE and Qwen3's fused per-head q/k RMSNorm + RoPE (``torch.ops.qwen3moe.*``).

* ``rope(q, k, cos, sin)``: transformers' ``apply_rotary_pos_emb`` (neox / rotate-half layout) computed in the
  dtype of q/k: ``q*cos + rotate_half(q)*sin``, every product and the sum rounded to that dtype.
* ``rope_positions(q, k, position_ids, inv_freq)``: the same with the table built in the kernel from arbitrary
  position ids (KV-cache decode, padded batches): ``cos/sin(float(pos) * inv_freq)`` in fp32, rounded to q's
  dtype, exactly as Qwen3MoeRotaryEmbedding; :func:`rope_by_positions` takes ``theta`` and builds ``inv_freq``.
* ``qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)`` (and ``qk_norm_rope_positions``): the attention
  prologue in one pass: per-head RMSNorm over head_dim (fp32 statistics, normed rounded to the dtype, times the
  [D] weight in the dtype, as Qwen3MoeRMSNorm), then the rotation.

Layouts (the reference's): q ``[B, S, Hq, D]``, k ``[B, S, Hk, D]``, cos/sin ``[B or 1, S, D]`` in q's dtype,
position_ids ``[B or 1, S]`` int32/int64, inv_freq fp32 ``[D/2]``. q/k may be strided views (for example of a
fused qkv projection: no copy is made); only a non-contiguous last dim is copied. Outputs are contiguous.

Where each piece lives: schemas in ``csrc/ops.cpp``; CPU kernels and the autograd kernels (C++, so no Python on
the call path) in ``csrc/rope_cpu.cpp``; CUDA kernels: the Triton kernels of ``kernels/rope.py``, registered
below (in fp32 the GPU contracts the rotation's multiply and add into an FMA: within tolerance of eager torch, not
bit-identical); fakes below. Backward: ``qwen3moe::qk_norm_rope_backward`` (input grads of q/k, weight grads with a
deterministic two-stage reduction). Gradients for cos/sin/inv_freq are not computed; requesting them is an error.
The backward op is not differentiable: double backward (``create_graph=True``, then differentiating the gradients)
raises.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import _ext, dispatch, reference

__all__ = ["rope", "rope_by_positions", "qk_norm_rope", "qk_norm_rope_by_positions", "rope_inv_freq",
           "qk_norm_rope_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(op, q, k, qw=None, kw=None, cos=None, sin=None, pos=None, inv_freq=None, eps=1.0):
    """The argument checks of the C++ kernels (csrc/rope_cpu.cpp), for fakes and the CUDA path."""
    torch._check(q.dim() == 4, lambda: f"{op}: q must be 4-D [B, S, Hq, D], got {q.dim()} dims")
    torch._check(k.dim() == 4, lambda: f"{op}: k must be 4-D [B, S, Hk, D], got {k.dim()} dims")
    torch._check(q.dtype in _DTYPES, lambda: f"{op}: q dtype must be float32/float16/bfloat16, got {q.dtype}")
    torch._check(k.dtype == q.dtype, lambda: f"{op}: k dtype {k.dtype} != q dtype {q.dtype}")
    torch._check(k.device == q.device, lambda: f"{op}: k must be on the device of q ({q.device})")
    B, S, _, D = q.shape
    torch._check(k.shape[0] == B and k.shape[1] == S and k.shape[3] == D,
                 lambda: f"{op}: k must be [{B}, {S}, Hk, {D}] like q {list(q.shape)}, got {list(k.shape)}")
    torch._check(D >= 2 and D % 2 == 0, lambda: f"{op}: head_dim (q.size(3)) must be even and >= 2, got {D}")
    for w, name in ((qw, "q_weight"), (kw, "k_weight")):
        if w is None:
            continue
        torch._check(w.dim() == 1 and w.shape[0] == D,
                     lambda: f"{op}: {name} must have shape [{D}], got {list(w.shape)}")
        torch._check(w.dtype == q.dtype, lambda: f"{op}: {name} dtype {w.dtype} != q dtype {q.dtype}")
        torch._check(w.device == q.device, lambda: f"{op}: {name} must be on the device of q")
    if qw is not None or kw is not None:
        torch._check(eps > 0, lambda: f"{op}: eps must be > 0, got {eps}")
    if pos is None:
        for t, name in ((cos, "cos"), (sin, "sin")):
            torch._check(t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == S and t.shape[2] == D,
                         lambda: f"{op}: {name} must be [{B} or 1, {S}, {D}], got {list(t.shape)}")
            torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} dtype {t.dtype} != q dtype {q.dtype} "
                                                     "(transformers casts cos/sin to the activations' dtype)")
            torch._check(t.device == q.device, lambda: f"{op}: {name} must be on the device of q")
    else:
        torch._check(pos.dim() == 2 and pos.shape[0] in (1, B) and pos.shape[1] == S,
                     lambda: f"{op}: position_ids must be [{B} or 1, {S}], got {list(pos.shape)}")
        torch._check(pos.dtype in (torch.int32, torch.int64),
                     lambda: f"{op}: position_ids must be int32 or int64, got {pos.dtype}")
        torch._check(pos.device == q.device, lambda: f"{op}: position_ids must be on the device of q")
        torch._check(inv_freq.dim() == 1 and inv_freq.shape[0] == D // 2 and inv_freq.dtype == torch.float32,
                     lambda: f"{op}: inv_freq must be float32 [{D // 2}]")
        torch._check(inv_freq.device == q.device, lambda: f"{op}: inv_freq must be on the device of q")


def _check_grads(grad_q, grad_k, q, k):
    """The backward's extra checks (as csrc/rope_cpu.cpp): output grads shaped and typed like q / k."""
    op = "qk_norm_rope_backward"
    torch._check(grad_q.shape == q.shape and grad_q.dtype == q.dtype,
                 lambda: f"{op}: grad_q must match q in shape and dtype")
    torch._check(grad_k.shape == k.shape and grad_k.dtype == k.dtype,
                 lambda: f"{op}: grad_k must match k in shape and dtype")


def _outs(q, k):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _last_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


if _ext.AVAILABLE:

    @torch.library.register_fake("qwen3moe::rope")
    def _rope_fake(q, k, cos, sin):
        _check("rope", q, k, cos=cos, sin=sin)
        return _outs(q, k)

    @torch.library.register_fake("qwen3moe::rope_positions")
    def _rope_positions_fake(q, k, position_ids, inv_freq):
        _check("rope_positions", q, k, pos=position_ids, inv_freq=inv_freq)
        return _outs(q, k)

    @torch.library.register_fake("qwen3moe::qk_norm_rope")
    def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, eps):
        _check("qk_norm_rope", q, k, q_weight, k_weight, cos, sin, eps=eps)
        return _outs(q, k)

    @torch.library.register_fake("qwen3moe::qk_norm_rope_positions")
    def _qk_norm_rope_positions_fake(q, k, q_weight, k_weight, position_ids, inv_freq, eps):
        _check("qk_norm_rope_positions", q, k, q_weight, k_weight, pos=position_ids, inv_freq=inv_freq, eps=eps)
        return _outs(q, k)

    @torch.library.register_fake("qwen3moe::qk_norm_rope_backward")
    def _qk_norm_rope_backward_fake(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, position_ids, inv_freq, eps):
        _check("qk_norm_rope_backward", q, k, q_weight, k_weight, cos, sin, position_ids, inv_freq, eps)
        _check_grads(grad_q, grad_k, q, k)
        dq, dk = _outs(q, k)
        dqw = torch.empty_like(q_weight) if q_weight is not None else q.new_empty((0,))
        dkw = torch.empty_like(k_weight) if k_weight is not None else q.new_empty((0,))
        return dq, dk, dqw, dkw

    # CUDA: the Triton kernels (imported on first use, so importing this module does not import triton)
    def _fwd_cuda(op, q, k, qw, kw, cos, sin, pos, inv_freq, eps):
        from ..kernels import rope as _k

        _check(op, q, k, qw, kw, cos, sin, pos, inv_freq, eps)
        qo, ko = _outs(q, k)
        q, k, cos, sin = (_last_contig(t) for t in (q, k, cos, sin))
        _k.qk_norm_rope_fwd(q, k, qw if qw is None else qw.contiguous(), kw if kw is None else kw.contiguous(),
                            cos, sin, None if pos is None else pos.long(),
                            None if inv_freq is None else inv_freq.contiguous(), eps, qo, ko)
        return qo, ko

    def _rope_cuda(q, k, cos, sin):
        return _fwd_cuda("rope", q, k, None, None, cos, sin, None, None, 1.0)

    def _rope_positions_cuda(q, k, position_ids, inv_freq):
        return _fwd_cuda("rope_positions", q, k, None, None, None, None, position_ids, inv_freq, 1.0)

    def _qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, eps):
        return _fwd_cuda("qk_norm_rope", q, k, q_weight, k_weight, cos, sin, None, None, eps)

    def _qk_norm_rope_positions_cuda(q, k, q_weight, k_weight, position_ids, inv_freq, eps):
        return _fwd_cuda("qk_norm_rope_positions", q, k, q_weight, k_weight, None, None, position_ids, inv_freq,
                         eps)

    def _qk_norm_rope_backward_cuda(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, position_ids, inv_freq,
                                    eps):
        from ..kernels import rope as _k

        _check("qk_norm_rope_backward", q, k, q_weight, k_weight, cos, sin, position_ids, inv_freq, eps)
        _check_grads(grad_q, grad_k, q, k)
        dq, dk = _outs(q, k)
        dqw = torch.empty_like(q_weight) if q_weight is not None else q.new_empty((0,))
        dkw = torch.empty_like(k_weight) if k_weight is not None else q.new_empty((0,))
        q, k, cos, sin = (_last_contig(t) for t in (q, k, cos, sin))
        _k.qk_norm_rope_bwd(grad_q.contiguous(), grad_k.contiguous(), q, k,
                            q_weight if q_weight is None else q_weight.contiguous(),
                            k_weight if k_weight is None else k_weight.contiguous(), cos, sin,
                            None if position_ids is None else position_ids.long(),
                            None if inv_freq is None else inv_freq.contiguous(), eps, dq, dk, dqw, dkw)
        return dq, dk, dqw, dkw

    torch.library.register_kernel("qwen3moe::rope", "cuda", _rope_cuda)
    torch.library.register_kernel("qwen3moe::rope_positions", "cuda", _rope_positions_cuda)
    torch.library.register_kernel("qwen3moe::qk_norm_rope", "cuda", _qk_norm_rope_cuda)
    torch.library.register_kernel("qwen3moe::qk_norm_rope_positions", "cuda", _qk_norm_rope_positions_cuda)
    torch.library.register_kernel("qwen3moe::qk_norm_rope_backward", "cuda", _qk_norm_rope_backward_cuda)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _impl(t: torch.Tensor) -> str | None:
    if not _ext.AVAILABLE:
        return None
    return {"cpu": "cpu", "cuda": "triton" if _HAS_TRITON else None}.get(t.device.type)


def _record(op: str, impl: str) -> None:
    if not torch.compiler.is_compiling():
        dispatch.record(op, impl)


@functools.lru_cache(maxsize=64)
def _inv_freq_cached(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under torch.inference_mode(): an inference tensor in this cache
    # would make every later autograd use of the op fail ("Inference tensors cannot be saved for backward")
    with torch.inference_mode(False):
        return _inv_freq(head_dim, theta, device)


def _inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    # exactly Qwen3MoeRotaryEmbedding's default rope: fp32 exponent from an int64 arange
    return (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).to(device)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """fp32 ``[head_dim/2]`` inverse frequencies of the default RoPE, as transformers builds them (cached)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return _inv_freq(head_dim, theta, device)
    return _inv_freq_cached(head_dim, float(theta), device)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q*cos + rotate_half(q)*sin, k*cos + rotate_half(k)*sin)`` in q's dtype (autograd for q and k)."""
    impl = _impl(q)
    if impl is None:
        dispatch.fallback("rope", _ext.no_kernel_reason(q.device))
        return reference.rope(q, k, cos, sin)
    _record("rope", impl)
    return torch.ops.qwen3moe.rope.default(q, k, cos, sin)


def rope_by_positions(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE at arbitrary ``position_ids [B or 1, S]``; the table is computed in the kernel (default rope, ``theta``,
    or the given fp32 ``inv_freq [D/2]``)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    impl = _impl(q)
    if impl is None:
        dispatch.fallback("rope", _ext.no_kernel_reason(q.device))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return reference.rope(q, k, emb.cos().to(q.dtype), emb.sin().to(q.dtype))
    _record("rope", impl)
    return torch.ops.qwen3moe.rope_positions.default(q, k, position_ids, inv_freq)


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope(rms_norm(q, q_weight), rms_norm(k, k_weight), cos, sin)`` with per-head norms, in one pass."""
    impl = _impl(q)
    if impl is None:
        dispatch.fallback("qk_norm_rope", _ext.no_kernel_reason(q.device))
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    _record("qk_norm_rope", impl)
    return torch.ops.qwen3moe.qk_norm_rope.default(q, k, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope_by_positions(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, position_ids: torch.Tensor,
    theta: float, eps: float, inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_norm_rope`` with the table computed in the kernel from ``position_ids`` (see rope_by_positions)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    impl = _impl(q)
    if impl is None:
        dispatch.fallback("qk_norm_rope", _ext.no_kernel_reason(q.device))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return reference.qk_norm_rope(q, k, q_weight, k_weight, emb.cos().to(q.dtype), emb.sin().to(q.dtype), eps)
    _record("qk_norm_rope", impl)
    return torch.ops.qwen3moe.qk_norm_rope_positions.default(q, k, q_weight, k_weight, position_ids, inv_freq, eps)


def qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight=None, k_weight=None, cos=None, sin=None,
                          position_ids=None, inv_freq=None, eps=1e-6):
    """The backward op autograd calls (exposed for tests/benchmarks): ``(dq, dk, dq_weight, dk_weight)``."""
    return torch.ops.qwen3moe.qk_norm_rope_backward.default(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin,
                                                            position_ids, inv_freq, eps)
