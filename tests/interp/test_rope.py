"""The RoPE / q-k-norm + RoPE Triton kernels (forward and backward, from a table or from positions) and the CUDA
registrations of ``ops/rope.py``, on CPU tensors under the interpreter, against the reference."""

import importlib

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.kernels.rope import qk_norm_rope_bwd, qk_norm_rope_fwd
from qwen3moe_kernels.ops import rope_inv_freq
from test_rope import BWD_TOL, EPS, THETA, _inputs
from tolerances import tol

ops_rope = importlib.import_module("qwen3moe_kernels.ops.rope")
NAN = float("nan")


def ntol(dtype):
    # bf16 under the interpreter: numpy has no bf16, fp32 -> bf16 truncates (a GPU rounds to nearest), and the
    # rotation rounds three times: a few bf16 ulps. fp32/fp16 are rounded to nearest as on a GPU.
    return dict(rtol=2.0**-5, atol=2.0**-5) if dtype == torch.bfloat16 else tol("elementwise", dtype)


@pytest.mark.parametrize("from_pos", [False, True], ids=["table", "positions"])
@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
@pytest.mark.parametrize("shape", [(1, 1, 32, 4, 128), (2, 3, 5, 3, 10), (1, 0, 4, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_forward_backward(dtype, shape, norm, from_pos):
    q, k, qw, kw, pos, cos, sin = _inputs(*shape, dtype, seed=11)
    inv = rope_inv_freq(shape[-1], THETA)
    g = torch.Generator().manual_seed(12)
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    w = (qw, kw) if norm else (None, None)
    ref = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS) if norm else reference.rope(q, k, cos, sin)
    ts = [t.detach().float().requires_grad_() for t in (q, k, qw, kw)]
    rf = (reference.qk_norm_rope(*ts, cos.float(), sin.float(), EPS) if norm
          else reference.rope(ts[0], ts[1], cos.float(), sin.float()))
    ((rf[0] * gq.float()).sum() + (rf[1] * gk.float()).sum()).backward()
    src = (None, None, pos, inv) if from_pos else (cos, sin, None, None)
    qo, ko = torch.full(q.shape, NAN, dtype=dtype), torch.full(k.shape, NAN, dtype=dtype)
    qk_norm_rope_fwd(q, k, *w, *src, EPS, qo, ko)
    torch.testing.assert_close(qo, ref[0], **ntol(dtype))
    torch.testing.assert_close(ko, ref[1], **ntol(dtype))
    dq, dk = torch.full(q.shape, NAN, dtype=dtype), torch.full(k.shape, NAN, dtype=dtype)
    dw = [torch.full((shape[-1],), NAN, dtype=dtype) for _ in range(2)] if norm else [None, None]
    qk_norm_rope_bwd(gq, gk, q, k, *w, *src, EPS, dq, dk, *dw)
    bt = BWD_TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=6e-2, atol=6e-2)
    torch.testing.assert_close(dq.float(), ts[0].grad, **bt)
    torch.testing.assert_close(dk.float(), ts[1].grad, **bt)
    if norm:
        torch.testing.assert_close(dw[0].float(), ts[2].grad, **bt)
        torch.testing.assert_close(dw[1].float(), ts[3].grad, **bt)


def test_cuda_registrations():
    """The CUDA implementations registered in ops/rope.py (argument plumbing: strided q/k, a [1, S, D] table, int32
    positions); output grads checked as on CPU; no q heads or no k heads."""
    q, k, qw, kw, _, _, _ = _inputs(3, 4, 5, 2, 16, torch.float32, seed=13)
    pos = torch.tensor([[3, 70, 900, 40000]], dtype=torch.int32)
    cos, sin = reference.rope_cos_sin(pos, 16, THETA, torch.float32)
    inv = rope_inv_freq(16, THETA)
    e = tol("elementwise", torch.float32)
    ref = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    for got in (ops_rope._qk_norm_rope_cuda(q, k, qw, kw, cos, sin, EPS),
                ops_rope._qk_norm_rope_positions_cuda(q, k, qw, kw, pos, inv, EPS)):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **e)
    ref = reference.rope(q, k, cos, sin)
    for got in (ops_rope._rope_cuda(q, k, cos, sin), ops_rope._rope_positions_cuda(q, k, pos, inv)):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **e)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    cpu = torch.ops.qwen3moe.qk_norm_rope_backward(gq, gk, q, k, qw, kw, cos, sin, None, None, EPS)
    for a, b in zip(ops_rope._qk_norm_rope_backward_cuda(gq, gk, q, k, qw, kw, cos, sin, None, None, EPS), cpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="grad_q must have q's shape"):
        ops_rope._qk_norm_rope_backward_cuda(gq[:, :2], gk, q, k, qw, kw, cos, sin, None, None, EPS)
    with pytest.raises(TypeError, match="grad_k must have k's dtype"):
        ops_rope._qk_norm_rope_backward_cuda(gq, gk.half(), q, k, qw, kw, cos, sin, None, None, EPS)
    for hq, hk in ((0, 2), (3, 0)):
        q0, k0 = torch.randn(3, 4, hq, 16), torch.randn(3, 4, hk, 16)
        want = reference.qk_norm_rope(q0, k0, qw, kw, cos, sin, EPS)
        for a, b in zip(ops_rope._qk_norm_rope_cuda(q0, k0, qw, kw, cos, sin, EPS), want):
            torch.testing.assert_close(a, b, **e)
        g0q, g0k = torch.randn(q0.shape), torch.randn(k0.shape)
        cpu = torch.ops.qwen3moe.qk_norm_rope_backward(g0q, g0k, q0, k0, qw, kw, cos, sin, None, None, EPS)
        got = ops_rope._qk_norm_rope_backward_cuda(g0q, g0k, q0, k0, qw, kw, cos, sin, None, None, EPS)
        for a, b in zip(got, cpu):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
