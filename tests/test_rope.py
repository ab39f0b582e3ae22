"""qwen3moe::rope / rope_positions / qk_norm_rope / qk_norm_rope_positions (and their backward) against the
reference and transformers' apply_rotary_pos_emb: the C++ CPU path (forward bit-exact where the arithmetic is the
same; autograd against autograd of the reference; double backward refused), opcheck, torch.compile(fullgraph=True),
bad input, and on a GPU when there is one, outputs poisoned beforehand. The Triton kernels under the interpreter:
tests/interp/test_rope.py."""

import importlib
import warnings

import pytest
import torch

from qwen3moe_kernels import recorder, reference
from qwen3moe_kernels.ops import qk_norm_rope, qk_norm_rope_positions, rope, rope_inv_freq, rope_positions
from tests.tolerances import assert_within_twice_torch_error, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THETA = 1e6
EPS = 1e-6
# (B, S, Hq, Hk, D): Qwen3-30B-A3B decode, 235B-A22B short prefill, odd head counts / head_dim, T = 0
SHAPES = [(1, 1, 32, 4, 128), (1, 3, 64, 4, 128), (2, 5, 3, 1, 10), (3, 7, 5, 3, 16), (2, 0, 4, 2, 128)]


def _inv(q):
    """The default RoPE's inv_freq for q's head_dim (what the positions ops build their table from)."""
    return rope_inv_freq(q.shape[-1], THETA, q.device)


def _inputs(B, S, Hq, Hk, D, dtype, seed=0, strided=True, device="cpu"):
    """q, k as views of one fused qkv projection (strided like the attention's), weights, positions, table.

    Random values are drawn on the CPU and moved to ``device`` before q and k are sliced out (``.to(device)`` of a
    strided view would copy it to a contiguous tensor)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, generator=g).to(dtype).to(device)
        q = qkv[..., : Hq * D].view(B, S, Hq, D)
        k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D)
    else:
        q = torch.randn(B, S, Hq, D, generator=g).to(dtype).to(device)
        k = torch.randn(B, S, Hk, D, generator=g).to(dtype).to(device)
    qw = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    kw = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    pos = torch.randint(0, 40000, (B, S), generator=g)  # arbitrary (decode / padded) positions, not 0..S-1
    cos, sin = reference.rope_cos_sin(pos, D, THETA, dtype)
    return (q, k) + tuple(t.to(device) for t in (qw, kw, pos, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_matches_reference(shape, dtype):
    q, k, qw, kw, pos, cos, sin = _inputs(*shape, dtype)
    rq, rk = reference.rope(q, k, cos, sin)
    # the rotation is the same fp32-rounded-to-dtype arithmetic as transformers': bit-identical
    for got, ref in zip(rope(q, k, cos, sin), (rq, rk)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # table from positions: cos/sin in fp32 by a different libm (1 fp32 ulp), rounded: within one dtype ulp
    for got, ref in zip(rope_positions(q, k, pos, _inv(q)), (rq, rk)):
        torch.testing.assert_close(got, ref, **tol("elementwise", dtype))
    nq, nk = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    for got, ref in zip(qk_norm_rope(q, k, qw, kw, cos, sin, EPS), (nq, nk)):
        torch.testing.assert_close(got, ref, **tol("norm", dtype))
        assert got.is_contiguous()
    for got, ref in zip(qk_norm_rope_positions(q, k, qw, kw, pos, _inv(q), EPS), (nq, nk)):
        torch.testing.assert_close(got, ref, **tol("norm", dtype))


def test_broadcast_table_and_int32_positions():
    q, k, qw, kw, _, _, _ = _inputs(3, 4, 4, 2, 16, torch.float32, seed=3, strided=False)
    pos = torch.tensor([[5, 900, 70000, 3]])  # [1, S]: one position row for the whole batch
    cos, sin = reference.rope_cos_sin(pos, 16, THETA, torch.float32)
    ref = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    for got, r in zip(qk_norm_rope(q, k, qw, kw, cos, sin, EPS), ref):
        torch.testing.assert_close(got, r, **tol("elementwise", torch.float32))
    for got, r in zip(qk_norm_rope_positions(q, k, qw, kw, pos.int(), _inv(q), EPS), ref):
        torch.testing.assert_close(got, r, **tol("elementwise", torch.float32))


def test_inv_freq_is_transformers():
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    cfg = Qwen3MoeConfig(hidden_size=256, num_attention_heads=4, head_dim=64, rope_theta=THETA)
    hf = Qwen3MoeRotaryEmbedding(cfg)
    torch.testing.assert_close(rope_inv_freq(64, THETA), hf.inv_freq, rtol=0, atol=0)
    x = torch.randn(1, 5, 256, dtype=torch.bfloat16)
    pos = torch.tensor([[0, 1, 17, 4095, 32767]])
    hc, hs = hf(x, pos)
    q = torch.randn(1, 5, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 5, 2, 64, dtype=torch.bfloat16)
    for got, ref in zip(rope_positions(q, k, pos, _inv(q)), reference.rope(q, k, hc, hs)):
        torch.testing.assert_close(got, ref, **tol("elementwise", torch.bfloat16))


def _leaf(t):
    """A leaf copy of ``t`` with its strides (``clone()`` would make a strided q/k view contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return leaf.requires_grad_()


def _grads(fn, tensors, gq, gk):
    ts = [_leaf(t.detach()) for t in tensors]
    oq, ok = fn(*ts)
    ((oq.float() * gq.float()).sum() + (ok.float() * gk.float()).sum()).backward()
    return [t.grad for t in ts]


# backward: ours is fp32 math rounded once, the reference's autograd rounds every step in the dtype. fp32: against
# the reference's autograd directly. fp16/bf16: the flash-attention rule against the fp32 autograd of the same
# (dtype-rounded) inputs: our error at most twice the error of the reference's own low-precision autograd, plus one
# unit of the dtype's epsilon times the gradient's magnitude (for tensors where the reference happens to be exact).
BWD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
           torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _assert_grads(ours, ref_lowp, ref32, dtype):
    for a, lo, hi in zip(ours, ref_lowp, ref32):
        assert a.dtype == lo.dtype and a.shape == lo.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, lo, **BWD_TOL[dtype])
            continue
        if a.numel() == 0:
            continue
        floor = torch.finfo(dtype).eps * hi.abs().max().item() + 1e-6
        assert_within_twice_torch_error(a, hi, lo, floor=floor)


def _check_backward(ours_fn, ref_fn, tensors, gq, gk, dtype, table=()):
    ours = _grads(ours_fn, tensors, gq, gk)
    lowp = _grads(ref_fn(*table), tensors, gq, gk)
    ref32 = _grads(ref_fn(*(t.float() for t in table)), [t.float() for t in tensors], gq, gk)
    _assert_grads(ours, lowp, ref32, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4, 2, 128), (2, 5, 3, 1, 10), (1, 0, 2, 1, 16)])
def test_backward_matches_reference_autograd(shape, dtype):
    q, k, qw, kw, pos, cos, sin = _inputs(*shape, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    gq = torch.randn(q.shape, generator=g).to(dtype)
    gk = torch.randn(k.shape, generator=g).to(dtype)
    norm_ref = lambda c, s: lambda a, b, wq, wk: reference.qk_norm_rope(a, b, wq, wk, c, s, EPS)  # noqa: E731
    rope_ref = lambda c, s: lambda a, b: reference.rope(a, b, c, s)  # noqa: E731
    _check_backward(lambda a, b, c, d: qk_norm_rope(a, b, c, d, cos, sin, EPS), norm_ref, (q, k, qw, kw), gq, gk,
                    dtype, (cos, sin))
    _check_backward(lambda a, b, c, d: qk_norm_rope_positions(a, b, c, d, pos, _inv(a), EPS), norm_ref,
                    (q, k, qw, kw), gq, gk, dtype, (cos, sin))
    _check_backward(lambda a, b: rope(a, b, cos, sin), rope_ref, (q, k), gq, gk, dtype, (cos, sin))
    _check_backward(lambda a, b: rope_positions(a, b, pos, _inv(a)), rope_ref, (q, k), gq, gk, dtype, (cos, sin))


def test_weight_grad_is_deterministic():
    q, k, qw, kw, pos, cos, sin = _inputs(2, 37, 8, 2, 128, torch.bfloat16, seed=9)
    gq, gk = torch.randn(q.shape).bfloat16(), torch.randn(k.shape).bfloat16()
    fn = lambda a, b, c, d: qk_norm_rope(a, b, c, d, cos, sin, EPS)  # noqa: E731
    first = _grads(fn, (q, k, qw, kw), gq, gk)
    for _ in range(2):
        for a, b in zip(first, _grads(fn, (q, k, qw, kw), gq, gk)):
            assert torch.equal(a, b)


def _four_ops(cos, sin, pos):
    """(ours, reference, uses the norm weights) for rope, rope_positions, qk_norm_rope, qk_norm_rope_positions;
    the reference of the positions variants takes the table ``cos, sin`` of ``pos``."""
    return [
        (lambda a, b: rope(a, b, cos, sin), lambda a, b: reference.rope(a, b, cos, sin), False),
        (lambda a, b: rope_positions(a, b, pos, _inv(a)), lambda a, b: reference.rope(a, b, cos, sin), False),
        (lambda a, b, c, d: qk_norm_rope(a, b, c, d, cos, sin, EPS),
         lambda a, b, c, d: reference.qk_norm_rope(a, b, c, d, cos, sin, EPS), True),
        (lambda a, b, c, d: qk_norm_rope_positions(a, b, c, d, pos, _inv(a), EPS),
         lambda a, b, c, d: reference.qk_norm_rope(a, b, c, d, cos, sin, EPS), True),
    ]


def test_double_backward_is_an_error():
    """qk_norm_rope_backward is not differentiable: for all four ops, differentiating the gradients of a
    create_graph=True backward raises (torch's autograd fallback used to warn and return zeros), while the
    first-order gradients themselves are right and no fallback warning is emitted."""
    q, k, qw, kw, pos, cos, sin = _inputs(1, 3, 2, 1, 16, torch.float32, seed=4)
    for ours, ref, norm in _four_ops(cos, sin, pos):
        ts = [_leaf(t) for t in ((q, k, qw, kw) if norm else (q, k))]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grads = torch.autograd.grad(sum((o**3).sum() for o in ours(*ts)), ts, create_graph=True)
        want = torch.autograd.grad(sum((o**3).sum() for o in ref(*ts)), ts)
        for g, e in zip(grads, want):
            torch.testing.assert_close(g.detach(), e, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(sum(g.sum() for g in grads), ts)


def test_matches_transformers():
    """Against transformers itself: Qwen3MoeRotaryEmbedding's table, apply_rotary_pos_emb in its own layout
    ([B, H, S, D], unsqueeze_dim=1) and, for qk_norm_rope, the attention's Qwen3MoeRMSNorm on [B, S, H, D] first."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding,
                                                                  apply_rotary_pos_emb)

    D = 64
    cfg = Qwen3MoeConfig(hidden_size=256, num_attention_heads=4, head_dim=D, rope_theta=THETA)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, qw, kw, _, _, _ = _inputs(2, 5, 4, 2, D, dtype, seed=21)
        pos = torch.tensor([[0, 1, 17, 4095, 32767], [3, 9, 100, 20000, 39999]])
        cos, sin = Qwen3MoeRotaryEmbedding(cfg)(q, pos)
        assert cos.dtype == dtype

        def hf_rope(a, b):
            qe, ke = apply_rotary_pos_emb(a.transpose(1, 2), b.transpose(1, 2), cos, sin)
            return qe.transpose(1, 2), ke.transpose(1, 2)

        for got, want in zip(rope(q, k, cos, sin), hf_rope(q, k)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same arithmetic: bit-identical
        for got, want in zip(rope_positions(q, k, pos, _inv(q)), hf_rope(q, k)):
            torch.testing.assert_close(got, want, **tol("elementwise", dtype))  # cos/sin by another libm
        q_norm, k_norm = Qwen3MoeRMSNorm(D, eps=EPS).to(dtype), Qwen3MoeRMSNorm(D, eps=EPS).to(dtype)
        with torch.no_grad():
            q_norm.weight.copy_(qw)
            k_norm.weight.copy_(kw)
            want = hf_rope(q_norm(q), k_norm(k))
        for got, w in zip(qk_norm_rope(q, k, qw, kw, cos, sin, EPS), want):
            torch.testing.assert_close(got, w, **tol("norm", dtype))
        for got, w in zip(qk_norm_rope_positions(q, k, qw, kw, pos, _inv(q), EPS), want):
            torch.testing.assert_close(got, w, **tol("norm", dtype))


def test_table_gradient_is_refused():
    q, k, qw, kw, pos, cos, sin = _inputs(1, 2, 2, 1, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="cos / sin / inv_freq are not implemented"):
        rope(q, k, cos.requires_grad_(), sin)


def test_bad_inputs():
    """Malformed shapes are a ValueError from the functions and the ops; a dtype an op does not take is a
    TypeError from the op (the functions run the reference for those: see the next test); eps <= 0 a ValueError."""
    q, k, qw, kw, pos, cos, sin = _inputs(2, 3, 4, 2, 16, torch.float32, strided=False)
    ops = torch.ops.qwen3moe
    inv = _inv(q)
    shapes = [
        (lambda f: f.rope(q[0], k, cos, sin), "q must be 4-D"),
        (lambda f: f.rope(q, k[:, :2], cos, sin), "k must be"),
        (lambda f: f.rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15]), "must be even"),
        (lambda f: f.rope(q, k, cos[:, :2], sin), r"cos must be \[2 or 1, 3, 16\]"),
        (lambda f: f.qk_norm_rope(q, k, qw[:8], kw, cos, sin, EPS), r"q_weight must have shape \[16\]"),
        (lambda f: f.rope_positions(q, k, pos[:, :2], inv), "position_ids must be"),
        (lambda f: f.rope_positions(q, k, pos, inv[:3]), r"inv_freq must be \[8\]"),
    ]
    import qwen3moe_kernels.ops as wrappers

    for fn, msg in shapes:
        for f in (wrappers, ops):
            with pytest.raises(ValueError, match=msg):
                fn(f)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.qk_norm_rope(q, k, qw, kw, cos, sin, 0.0)
    dtypes = [
        (lambda: ops.rope(q, k.half(), cos, sin), "k dtype"),
        (lambda: ops.rope(q, k, cos.half(), sin), "cos dtype"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw.half(), cos, sin, EPS), "k_weight dtype"),
        (lambda: ops.rope_positions(q, k, pos.float(), inv), "position_ids must be int32 or int64"),
        (lambda: ops.rope(q.double(), k.double(), cos.double(), sin.double()), "q dtype must be"),
    ]
    for fn, msg in dtypes:
        with pytest.raises(TypeError, match=msg):
            fn()


def test_inputs_no_kernel_takes_run_the_reference_visibly():
    """Valid inputs the kernels do not take (float64, an fp32 norm weight on bf16 activations, float positions,
    eps = 0) give the reference's result, with a FallbackWarning and implementations() saying why."""
    q, k, qw, kw, pos, cos, sin = _inputs(2, 3, 4, 2, 16, torch.bfloat16, strided=False)
    cases = [
        ("qk_norm_rope", lambda: qk_norm_rope(q, k, qw.float(), kw.float(), cos, sin, EPS),
         lambda: reference.qk_norm_rope(q, k, qw.float(), kw.float(), cos, sin, EPS)),
        ("qk_norm_rope", lambda: qk_norm_rope(q, k, qw, kw, cos, sin, 0.0),
         lambda: reference.qk_norm_rope(q, k, qw, kw, cos, sin, 0.0)),
        ("rope", lambda: rope(q.double(), k.double(), cos.double(), sin.double()),
         lambda: reference.rope(q.double(), k.double(), cos.double(), sin.double())),
        ("rope_positions", lambda: rope_positions(q, k, pos.float(), _inv(q)),
         lambda: reference.rope(q, k, *reference.rope_cos_sin(pos, 16, THETA, q.dtype))),
    ]
    for op, ours, ref in cases:
        recorder.reset()
        with pytest.warns(recorder.FallbackWarning, match=op):
            got = ours()
        assert recorder.implementations()[op].startswith("reference ("), recorder.implementations()
        for a, b in zip(got, ref()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_and_compile():
    q, k, qw, kw, pos, cos, sin = _inputs(2, 3, 4, 2, 16, torch.float32)
    inv = rope_inv_freq(16, THETA)
    ops = torch.ops.qwen3moe
    for args in ((ops.rope.default, (q, k, cos, sin)), (ops.rope_positions.default, (q, k, pos, inv)),
                 (ops.qk_norm_rope.default, (q, k, qw, kw, cos, sin, EPS)),
                 (ops.qk_norm_rope_positions.default, (q, k, qw, kw, pos, inv, EPS))):
        torch.library.opcheck(*args)
    # with gradients: opcheck's AOT-autograd test traces the C++ autograd kernel and the backward op's fake
    grads = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    torch.library.opcheck(ops.qk_norm_rope.default, (*grads, cos, sin, EPS))
    torch.library.opcheck(ops.rope_positions.default, (grads[0], grads[1], pos, inv))
    torch.library.opcheck(ops.qk_norm_rope_backward.default, (q.contiguous(), k.contiguous(), q, k, qw, kw, cos, sin,
                                                              None, None, EPS))

    def attn_prologue(q, k, qw, kw, cos, sin, pos):
        a = qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
        b = rope_positions(q, k, pos, inv)
        return a[0] + b[0], a[1] + b[1]

    f = torch.compile(attn_prologue, fullgraph=True, backend="aot_eager")
    got = f(q, k, qw, kw, cos, sin, pos)
    ra, rb = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS), reference.rope(q, k, cos, sin)
    torch.testing.assert_close(got[0], ra[0] + rb[0], **tol("elementwise", torch.float32))
    torch.testing.assert_close(got[1], ra[1] + rb[1], **tol("elementwise", torch.float32))


def test_public_function_runs_the_kernel():
    q, k, qw, kw, pos, cos, sin = _inputs(1, 3, 4, 2, 16, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when the inputs fit
        got = qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert recorder.implementations()["qk_norm_rope"] == "cpu"
    for a, b in zip(got, reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)):
        torch.testing.assert_close(a, b, **tol("elementwise", torch.bfloat16))


# ---------------------------------------------------------------------------------- GPU (skipped without one)

# (B, S, Hq, Hk, D): Qwen3-30B-A3B and Qwen3-235B-A22B attention heads; q/k strided views of a qkv projection
GPU_SHAPES = [(2, 33, 32, 4, 128), (1, 17, 64, 4, 128)]


def _kernel_table(pos, D, dtype):
    """The table the kernels build from ``pos``: ``f = float(pos) * inv_freq`` in fp32, cos/sin of it to the last
    fp32 bit (taken here from fp64), then rounded to ``dtype``. The GPU tests of the positions variants compare with
    it: torch's fp32 cos/sin (a few ulps on a GPU) can round to another fp16/bf16 value now and then."""
    f = pos.cpu()[..., None].float() * rope_inv_freq(D, THETA)
    emb = torch.cat((f, f), dim=-1).double()
    return emb.cos().float().to(dtype).to(pos.device), emb.sin().float().to(dtype).to(pos.device)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_forward_matches_reference(shape, dtype):
    q, k, qw, kw, pos, cos, sin = _inputs(*shape, dtype, device="cuda")
    assert not q.is_contiguous() and q.is_cuda
    kcos, ksin = _kernel_table(pos, shape[-1], dtype)
    # rope: each product rounded to the dtype, then the sum (in fp32 contracted into an FMA): "elementwise". With
    # the norm, rstd by another summation order and the approximate rsqrt can move normed by an ulp: "norm".
    e, n = tol("elementwise", dtype), tol("norm", dtype)
    for got, want in zip(rope(q, k, cos, sin), reference.rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want, **e)
    for got, want in zip(rope_positions(q, k, pos, _inv(q)), reference.rope(q, k, kcos, ksin)):
        torch.testing.assert_close(got, want, **e)
    for got, want in zip(qk_norm_rope(q, k, qw, kw, cos, sin, EPS),
                         reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)):
        torch.testing.assert_close(got, want, **n)
    for got, want in zip(qk_norm_rope_positions(q, k, qw, kw, pos, _inv(q), EPS),
                         reference.qk_norm_rope(q, k, qw, kw, kcos, ksin, EPS)):
        torch.testing.assert_close(got, want, **n)
    assert recorder.implementations() == dict.fromkeys(
        ("rope", "rope_positions", "qk_norm_rope", "qk_norm_rope_positions"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backward_matches_reference(shape, dtype):
    """All four ops' Triton backward (through the C++ autograd kernel) by the rules of the CPU backward test, and
    bit-identical when run twice (fixed-order weight-gradient reduction)."""
    q, k, qw, kw, pos, cos, sin = _inputs(*shape, dtype, seed=7, device="cuda")
    kcos, ksin = _kernel_table(pos, shape[-1], dtype)
    g = torch.Generator().manual_seed(8)
    gq = torch.randn(q.shape, generator=g).to(dtype).cuda()
    gk = torch.randn(k.shape, generator=g).to(dtype).cuda()
    norm_ref = lambda c, s: lambda a, b, wq, wk: reference.qk_norm_rope(a, b, wq, wk, c, s, EPS)  # noqa: E731
    rope_ref = lambda c, s: lambda a, b: reference.rope(a, b, c, s)  # noqa: E731
    cases = [
        (lambda a, b: rope(a, b, cos, sin), rope_ref, (q, k), (cos, sin)),
        (lambda a, b: rope_positions(a, b, pos, _inv(a)), rope_ref, (q, k), (kcos, ksin)),
        (lambda a, b, c, d: qk_norm_rope(a, b, c, d, cos, sin, EPS), norm_ref, (q, k, qw, kw), (cos, sin)),
        (lambda a, b, c, d: qk_norm_rope_positions(a, b, c, d, pos, _inv(a), EPS), norm_ref, (q, k, qw, kw),
         (kcos, ksin)),
    ]
    for ours, ref, tensors, table in cases:
        _check_backward(ours, ref, tensors, gq, gk, dtype, table)
        first, again = _grads(ours, tensors, gq, gk), _grads(ours, tensors, gq, gk)
        assert all(a.is_cuda and torch.equal(a, b) for a, b in zip(first, again))
    assert recorder.implementations() == dict.fromkeys(
        ("rope", "rope_positions", "qk_norm_rope", "qk_norm_rope_positions"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_write_every_output(dtype):
    """The launchers on NaN-poisoned outputs, for every (norm, table source) variant: bit-identical to the op's
    result (the same launch; the op is checked against the reference above), so every element was written."""
    from qwen3moe_kernels.kernels.rope import qk_norm_rope_bwd, qk_norm_rope_fwd

    B, S, Hq, Hk, D = GPU_SHAPES[1]
    q, k, qw, kw, pos, cos, sin = _inputs(B, S, Hq, Hk, D, dtype, seed=5, device="cuda")
    inv = rope_inv_freq(D, THETA, "cuda")
    gq = torch.randn(q.shape, dtype=dtype, device="cuda")  # output grads: contiguous, as autograd passes them
    gk = torch.randn(k.shape, dtype=dtype, device="cuda")
    ops = torch.ops.qwen3moe

    def poisoned(like):
        return torch.full(like.shape, float("nan"), dtype=dtype, device="cuda")

    for norm in (False, True):
        w = (qw, kw) if norm else (None, None)
        for src in ((cos, sin, None, None), (None, None, pos, inv)):
            qo, ko = poisoned(q), poisoned(k)
            qk_norm_rope_fwd(q, k, *w, *src, EPS, qo, ko)
            if norm:
                want = (ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS) if src[2] is None
                        else ops.qk_norm_rope_positions(q, k, qw, kw, pos, inv, EPS))
            else:
                want = ops.rope(q, k, cos, sin) if src[2] is None else ops.rope_positions(q, k, pos, inv)
            assert torch.equal(qo, want[0]) and torch.equal(ko, want[1])
            dq, dk = poisoned(q), poisoned(k)
            dw = (poisoned(qw), poisoned(kw)) if norm else (None, None)
            qk_norm_rope_bwd(gq, gk, q, k, *w, *src, EPS, dq, dk, *dw)
            want = ops.qk_norm_rope_backward(gq, gk, q, k, *w, *src, EPS)
            assert torch.equal(dq, want[0]) and torch.equal(dk, want[1])
            if norm:
                assert torch.equal(dw[0], want[2]) and torch.equal(dw[1], want[3])


def test_training_after_inference_mode_first_use():
    """The cached inv_freq is made outside inference mode: inference first, then training, must work (it once
    failed with "Inference tensors cannot be saved for backward")."""
    rope_ops = importlib.import_module("qwen3moe_kernels.ops.rope")

    rope_ops._inv_freq_cached.cache_clear()
    q, k, qw, kw, pos, _, _ = _inputs(1, 5, 4, 2, 64, torch.float32, seed=3)
    with torch.inference_mode():
        qk_norm_rope_positions(q, k, qw, kw, pos, _inv(q), EPS)
    q = q.detach().requires_grad_()
    oq, ok = qk_norm_rope_positions(q, k, qw, kw, pos, _inv(q), EPS)
    (oq.sum() + ok.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
