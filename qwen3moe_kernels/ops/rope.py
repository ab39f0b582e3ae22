"""Rotate-half RoPE and Qwen3's fused per-head q/k RMSNorm + RoPE (``torch.ops.qwen3moe.*``).

* ``rope(q, k, cos, sin)``: transformers' ``apply_rotary_pos_emb`` (neox layout), computed in q's dtype;
  ``rope_positions(q, k, position_ids, inv_freq)`` builds the table in the kernel, as Qwen3MoeRotaryEmbedding.
* ``qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)`` (and ``qk_norm_rope_positions``): per-head RMSNorm of
  q and k over head_dim (as Qwen3MoeRMSNorm), then the rotation, in one pass.

Layouts: q ``[B, S, Hq, D]``, k ``[B, S, Hk, D]`` (strided views fine, last dim contiguous), cos/sin
``[B or 1, S, D]`` in q's dtype, position_ids ``[B or 1, S]`` int, inv_freq fp32 ``[D/2]``; outputs contiguous.
Kernels: CPU and autograd ``csrc/rope_cpu.cpp``; CUDA: the Triton kernels of ``kernels/rope.py``, registered
below. Details (rounding, FMA contraction on GPU, the backward): ``docs/ops/rope.md``.
"""

from __future__ import annotations

import functools

import torch

from .. import _ext, reference
from ..recorder import fallback, record
from ._checks import FLOAT_DTYPES, check, check_device, check_dtype, check_like


def _check(op, q, k, qw=None, kw=None, cos=None, sin=None, pos=None, inv_freq=None, eps=1.0):
    """What the kernels take (the C++ kernels check the same): the shapes, then the dtypes and eps."""
    _check_shapes(op, q, k, qw, kw, cos, sin, pos, inv_freq)
    check_dtype(op, "q", q)
    for name, t in (("k", k), ("q_weight", qw), ("k_weight", kw), ("cos", cos), ("sin", sin)):
        if t is not None:
            check_like(op, name, t, q, "q")
    if qw is not None or kw is not None:
        check(op, eps > 0, lambda: f"eps must be > 0, got {eps}")
    if pos is not None:
        check_dtype(op, "position_ids", pos, (torch.int32, torch.int64))
        check_dtype(op, "inv_freq", inv_freq, (torch.float32,))


def _check_grads(grad_q, grad_k, q, k):
    """The backward's extra checks (as csrc/rope_cpu.cpp): output grads shaped and typed like q / k."""
    op = "qk_norm_rope_backward"
    for g, t, name in ((grad_q, q, "q"), (grad_k, k, "k")):
        check(op, g.shape == t.shape, lambda: f"grad_{name} must have {name}'s shape {list(t.shape)}")
        check_like(op, f"grad_{name}", g, t, name)


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


def _check_shapes(op, q, k, qw=None, kw=None, cos=None, sin=None, pos=None, inv_freq=None):
    """What any (q/k-norm +) RoPE needs (ValueError): the layouts of the module docstring, on q's device."""
    check(op, q.dim() == 4, lambda: f"q must be 4-D [B, S, Hq, D], got {q.dim()} dims")
    check(op, k.dim() == 4, lambda: f"k must be 4-D [B, S, Hk, D], got {k.dim()} dims")
    B, S, _, D = q.shape
    check(op, k.shape[0] == B and k.shape[1] == S and k.shape[3] == D,
          lambda: f"k must be [{B}, {S}, Hk, {D}] like q {list(q.shape)}, got {list(k.shape)}")
    check(op, D >= 2 and D % 2 == 0, lambda: f"head_dim (q.size(3)) must be even and >= 2, got {D}")
    named = [("k", k), ("q_weight", qw), ("k_weight", kw), ("cos", cos), ("sin", sin), ("position_ids", pos),
             ("inv_freq", inv_freq)]
    for name, t in named:
        if t is not None:
            check_device(op, name, t, q.device, "q")
    for w, name in ((qw, "q_weight"), (kw, "k_weight")):
        if w is not None:
            check(op, w.dim() == 1 and w.shape[0] == D, lambda: f"{name} must have shape [{D}], got {list(w.shape)}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t is not None:
            check(op, t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == S and t.shape[2] == D,
                  lambda: f"{name} must be [{B} or 1, {S}, {D}], got {list(t.shape)}")
    if pos is not None:
        check(op, pos.dim() == 2 and pos.shape[0] in (1, B) and pos.shape[1] == S,
              lambda: f"position_ids must be [{B} or 1, {S}], got {list(pos.shape)}")
        check(op, inv_freq.dim() == 1 and inv_freq.shape[0] == D // 2,
              lambda: f"inv_freq must be [{D // 2}], got {list(inv_freq.shape)}")


def _no_kernel(q, k, tensors, pos=None, inv_freq=None, eps=1.0) -> str | None:
    """Why no kernel takes these (valid) inputs, or None: the kernels take one fp32/fp16/bf16 dtype for q, k, the
    norm weights and cos/sin, int position ids and an fp32 inv_freq, and eps > 0."""
    if _ext.kernel_impl(q.device, triton=True) is None:
        return _ext.no_kernel_reason(q.device, triton=True)
    dtypes = {t.dtype for t in (q, k, *tensors) if t is not None}
    if q.dtype not in FLOAT_DTYPES or len(dtypes) > 1:
        return (f"the kernels take one fp32/fp16/bf16 dtype for q, k, weights and cos/sin, got "
                f"{sorted(str(d) for d in dtypes)} (cast the model to one dtype to run them)")
    if pos is not None and (pos.dtype not in (torch.int32, torch.int64) or inv_freq.dtype != torch.float32):
        return f"the kernels take int32/int64 position_ids and fp32 inv_freq, got {pos.dtype} and {inv_freq.dtype}"
    if not eps > 0:
        return f"the kernels take eps > 0, got {eps}"
    return None


def _table(position_ids, inv_freq, dtype):
    """cos, sin ``[B or 1, S, D]`` of ``position_ids`` as the kernels build them (the reference's inputs)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q*cos + rotate_half(q)*sin, k*cos + rotate_half(k)*sin)`` in q's dtype (differentiable in q and k)."""
    _check_shapes("rope", q, k, cos=cos, sin=sin)
    reason = _no_kernel(q, k, (cos, sin))
    if reason is not None:
        fallback("rope", reason)
        return reference.rope(q, k, cos, sin)
    record("rope", _ext.kernel_impl(q.device, triton=True))
    return torch.ops.qwen3moe.rope.default(q, k, cos, sin)


def rope_positions(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope` at ``position_ids [B or 1, S]``, its table built in the kernel from fp32 ``inv_freq [D/2]``
    (:func:`rope_inv_freq` gives the default RoPE's)."""
    _check_shapes("rope_positions", q, k, pos=position_ids, inv_freq=inv_freq)
    reason = _no_kernel(q, k, (), position_ids, inv_freq)
    if reason is not None:
        fallback("rope_positions", reason)
        return reference.rope(q, k, *_table(position_ids, inv_freq, q.dtype))
    record("rope_positions", _ext.kernel_impl(q.device, triton=True))
    return torch.ops.qwen3moe.rope_positions.default(q, k, position_ids, inv_freq)


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope(rms_norm(q, q_weight), rms_norm(k, k_weight), cos, sin)`` with per-head norms, in one pass."""
    _check_shapes("qk_norm_rope", q, k, q_weight, k_weight, cos, sin)
    reason = _no_kernel(q, k, (q_weight, k_weight, cos, sin), eps=eps)
    if reason is not None:
        fallback("qk_norm_rope", reason)
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    record("qk_norm_rope", _ext.kernel_impl(q.device, triton=True))
    return torch.ops.qwen3moe.qk_norm_rope.default(q, k, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope_positions(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, position_ids: torch.Tensor,
    inv_freq: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope` with the table built in the kernel from ``position_ids`` (see :func:`rope_positions`)."""
    _check_shapes("qk_norm_rope_positions", q, k, q_weight, k_weight, pos=position_ids, inv_freq=inv_freq)
    reason = _no_kernel(q, k, (q_weight, k_weight), position_ids, inv_freq, eps)
    if reason is not None:
        fallback("qk_norm_rope_positions", reason)
        return reference.qk_norm_rope(q, k, q_weight, k_weight, *_table(position_ids, inv_freq, q.dtype), eps)
    record("qk_norm_rope_positions", _ext.kernel_impl(q.device, triton=True))
    return torch.ops.qwen3moe.qk_norm_rope_positions.default(q, k, q_weight, k_weight, position_ids, inv_freq, eps)


def qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight=None, k_weight=None, cos=None, sin=None,
                          position_ids=None, inv_freq=None, eps=1e-6):
    """The backward op autograd calls (exposed for tests/benchmarks): ``(dq, dk, dq_weight, dk_weight)``."""
    return torch.ops.qwen3moe.qk_norm_rope_backward.default(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin,
                                                            position_ids, inv_freq, eps)
