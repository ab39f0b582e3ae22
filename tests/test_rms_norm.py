"""qwen3moe::rms_norm / fused_add_rms_norm against reference.rms_norm (and transformers' Qwen3MoeRMSNorm): CPU
path, autograd (gradcheck; double backward refused), opcheck, compile, bad and unsupported inputs, and on a GPU
when there is one. The Triton kernels under the interpreter: tests/interp/test_rms_norm.py."""

import warnings

import pytest
import torch

from qwen3moe_kernels import recorder, reference
from qwen3moe_kernels.ops.rms_norm import fused_add_rms_norm, rms_norm
from tests.tolerances import assert_within_twice_torch_error, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 64), (1, 2048), (3, 5, 769), (7, 128), (2, 4096)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_matches_reference(shape, dtype):
    x, r, w = _inputs(shape, dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **tol("norm", dtype))
    out, nr = fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_nr = reference.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(nr, ref_nr, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **tol("norm", dtype))


def test_strided_rows():
    x, _, w = _inputs((6, 2 * 769), torch.float32)
    xs = x[:, ::2]
    torch.testing.assert_close(rms_norm(xs, w[:769].contiguous(), 1e-6), reference.rms_norm(xs, w[:769], 1e-6))


def test_bad_inputs():
    """A malformed weight is a ValueError from the function and the op; a dtype or eps the kernels do not take is
    an error from the op (TypeError, ValueError) and a visible reference run from the function (next test)."""
    x, _, w = _inputs((4, 64), torch.float32)
    for fn in (rms_norm, torch.ops.qwen3moe.rms_norm):
        with pytest.raises(ValueError, match=r"weight must have shape \[64\]"):
            fn(x, w[:10], 1e-6)
    with pytest.raises(ValueError, match="eps must be > 0"):
        torch.ops.qwen3moe.rms_norm(x, w, 0.0)
    with pytest.raises(TypeError, match="weight dtype"):
        torch.ops.qwen3moe.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fused_add_rms_norm(x, x[:2], w, 1e-6)


def test_inputs_no_kernel_takes_run_the_reference_visibly():
    """transformers accepts an fp32 norm weight on bf16 activations (it promotes), float64 and eps = 0: the same
    numbers as the reference, with a FallbackWarning and implementations() saying why."""
    x, r, w = _inputs((4, 64), torch.bfloat16)
    cases = [(x, r, w.float(), 1e-6), (x.double(), r.double(), w.double(), 1e-6), (x, r, w, 0.0)]
    for xi, ri, wi, eps in cases:
        recorder.reset()
        with pytest.warns(recorder.FallbackWarning, match="rms_norm runs the pure-PyTorch reference"):
            got = rms_norm(xi, wi, eps)
        assert torch.equal(got, reference.rms_norm(xi, wi, eps))
        assert recorder.implementations()["rms_norm"].startswith("reference (")
        with pytest.warns(recorder.FallbackWarning, match="fused_add_rms_norm"):
            got = fused_add_rms_norm(xi, ri, wi, eps)
        for a, b in zip(got, reference.fused_add_rms_norm(xi, ri, wi, eps)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(dtype):
    x, r, w = _inputs((3, 5, 83), dtype, seed=1)
    dy = torch.randn(3, 5, 83).to(dtype)
    for fused in (False, True):
        a = [t.clone().requires_grad_() for t in (x, r, w)]
        b = [t.clone().requires_grad_() for t in (x, r, w)]
        if fused:
            o1, n1 = fused_add_rms_norm(a[0], a[1], a[2], 1e-6)
            o2, n2 = reference.fused_add_rms_norm(b[0], b[1], b[2], 1e-6)
            ((o1 * dy).sum() + n1.sum()).backward()
            ((o2 * dy).sum() + n2.sum()).backward()
            pairs = zip(a, b)
        else:
            (rms_norm(a[0], a[2], 1e-6) * dy).sum().backward()
            (reference.rms_norm(b[0], b[2], 1e-6) * dy).sum().backward()
            pairs = [(a[0], b[0]), (a[2], b[2])]
        t = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
        for p, q in pairs:
            torch.testing.assert_close(p.grad, q.grad, **t)


def test_gradcheck_in_fp32():
    """torch.autograd.gradcheck (finite differences against the backward kernel) of both ops. The op takes no fp64,
    so it runs in fp32 between casts: a 1e-3 step over fp32 outputs of size ~3 leaves ~2e-4 of rounding noise in
    each finite difference, under the 1e-3 tolerances (the default fp64 ones would need an fp64 kernel)."""
    x, r, w = (t.double().requires_grad_() for t in _inputs((2, 17), torch.float32, seed=2))
    f32 = dict(eps=1e-3, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradcheck(lambda a, c: rms_norm(a.float(), c.float(), 1e-5).double(), (x, w), **f32)

    def fused(a, b, c):
        return tuple(t.double() for t in fused_add_rms_norm(a.float(), b.float(), c.float(), 1e-5))

    assert torch.autograd.gradcheck(fused, (x, r, w), **f32)


@pytest.mark.parametrize("fused", [False, True])
def test_double_backward_is_an_error(fused):
    """rms_norm_backward is not differentiable: differentiating the gradients of a create_graph=True backward
    raises (torch's autograd fallback used to warn and return zeros). The first-order gradients themselves are
    right, and no fallback warning is emitted."""
    x, r, w = _inputs((3, 16), torch.float32, seed=4)
    dy = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    if fused:
        ours = lambda a, b, c: fused_add_rms_norm(a, b, c, 1e-6)  # noqa: E731
        ref = lambda a, b, c: reference.fused_add_rms_norm(a, b, c, 1e-6)  # noqa: E731
        inputs = (x, r, w)
    else:
        ours = lambda a, c: (rms_norm(a, c, 1e-6),)  # noqa: E731
        ref = lambda a, c: (reference.rms_norm(a, c, 1e-6),)  # noqa: E731
        inputs = (x, w)
    # a loss whose gradient depends on the output, and a linear one (the gradient then depends on x only)
    for loss in (lambda outs: sum((o**3).sum() for o in outs), lambda outs: sum((o * dy).sum() for o in outs)):
        ts = [t.clone().requires_grad_() for t in inputs]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grads = torch.autograd.grad(loss(ours(*ts)), ts, create_graph=True)
        want = torch.autograd.grad(loss(ref(*ts)), ts)
        for g, e in zip(grads, want):
            torch.testing.assert_close(g.detach(), e, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(sum(g.sum() for g in grads), ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_module(dtype):
    """Against transformers' Qwen3MoeRMSNorm module itself (forward; backward in fp32), not only reference.py."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    x, r, w = _inputs((3, 5, 769), dtype, seed=10)
    hf = Qwen3MoeRMSNorm(769, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        torch.testing.assert_close(rms_norm(x, w, 1e-6), hf(x), **tol("norm", dtype))
        out, new_res = fused_add_rms_norm(x, r, w, 1e-6)
        torch.testing.assert_close(new_res, r + x, rtol=0, atol=0)  # the decoder layer's residual add
        torch.testing.assert_close(out, hf(r + x), **tol("norm", dtype))
    if dtype == torch.float32:
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        (rms_norm(xa, wa, 1e-6) * dy).sum().backward()
        xh = x.clone().requires_grad_()
        (hf(xh) * dy).sum().backward()
        torch.testing.assert_close(xa.grad, xh.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(wa.grad, hf.weight.grad, rtol=1e-4, atol=1e-5)


def test_opcheck_and_compile():
    x, r, w = _inputs((3, 769), torch.float32)
    torch.library.opcheck(torch.ops.qwen3moe.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.qwen3moe.fused_add_rms_norm.default, (x, r, w, 1e-6))
    xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))  # AOT autograd through the C++ autograd kernels
    torch.library.opcheck(torch.ops.qwen3moe.rms_norm.default, (xg, wg, 1e-6))
    torch.library.opcheck(torch.ops.qwen3moe.fused_add_rms_norm.default, (xg, rg, wg, 1e-6))
    torch.library.opcheck(torch.ops.qwen3moe.rms_norm_backward.default, (x, x, w, 1e-6))
    f = torch.compile(lambda a, b, c: fused_add_rms_norm(a, b, c, 1e-6), fullgraph=True, backend="eager")
    out, nr = f(x, r, w)
    torch.testing.assert_close(out, reference.fused_add_rms_norm(x, r, w, 1e-6)[0])


def _leaf(t):
    """A leaf copy of ``t`` with its strides (``clone()`` would make a strided view contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return leaf.requires_grad_()


def _norm_grads(fn, tensors, dy):
    ts = [_leaf(t.detach()) for t in tensors]
    outs = fn(*ts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = (outs[0].float() * dy.float()).sum()
    if len(outs) > 1:  # fused: the new residual is used downstream too
        loss = loss + (outs[1].float() * dy.float().flip(-1)).sum()
    loss.backward()
    return [t.grad for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 769), (1, 769), (4, 769), (3, 2, 2048)])
def test_cpu_backward_odd_shapes(shape, dtype):
    """Backward (C++ CPU kernel) against the reference's autograd: fp32 directly; fp16/bf16 by the flash-attention
    rule against the fp32 autograd of the same inputs (the reference rounds every step in the dtype, we once)."""
    x, r, w = _inputs(shape, dtype, seed=5)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    for ours_fn, ref_fn, ts in (
        (lambda a, c: rms_norm(a, c, 1e-6), lambda a, c: reference.rms_norm(a, c, 1e-6), (x, w)),
        (lambda a, b, c: fused_add_rms_norm(a, b, c, 1e-6), lambda a, b, c: reference.fused_add_rms_norm(a, b, c, 1e-6),
         (x, r, w)),
    ):
        ours = _norm_grads(ours_fn, ts, dy)
        lowp = _norm_grads(ref_fn, ts, dy)
        ref32 = _norm_grads(ref_fn, [t.float() for t in ts], dy)
        for a, lo, hi in zip(ours, lowp, ref32):
            assert a.dtype == dtype and a.shape == lo.shape
            if dtype == torch.float32:
                torch.testing.assert_close(a, lo, rtol=1e-4, atol=1e-5)
            elif a.numel():
                assert_within_twice_torch_error(a, hi, lo, floor=torch.finfo(dtype).eps * hi.abs().max().item() + 1e-6)


def test_backward_strided_rows_and_determinism():
    x, _, w = _inputs((37, 2 * 769), torch.bfloat16, seed=9)
    w = w[:769].contiguous()
    xs = x[:, ::2]  # last dim strided: copied; rows strided below
    xr = x[:, :769]
    dy = torch.randn(37, 769).bfloat16()
    for xin in (xs, xr):
        first = _norm_grads(lambda a, c: rms_norm(a, c, 1e-6), (xin, w), dy)
        again = _norm_grads(lambda a, c: rms_norm(a, c, 1e-6), (xin, w), dy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # fixed-order dweight reduction
        ref32 = _norm_grads(lambda a, c: reference.rms_norm(a, c, 1e-6), (xin.float(), w.float()), dy)
        lowp = _norm_grads(lambda a, c: reference.rms_norm(a, c, 1e-6), (xin, w), dy)
        for a, lo, hi in zip(first, lowp, ref32):
            assert_within_twice_torch_error(a, hi, lo, floor=2.0**-8 * hi.abs().max().item())


# ---------------------------------------------------------------------------------- GPU (skipped without one)

GPU_HIDDEN = [2048, 4096, 769]  # Qwen3-30B-A3B, Qwen3-235B-A22B, and one that is not a power of two


def _cuda_inputs(lead, h, dtype, seed, strided):
    """x, residual [*lead, h] and weight [h] on the GPU; ``strided``: x and residual are views with row stride 2h
    (sliced on the GPU: ``.cuda()`` of a sliced CPU view would copy it to a contiguous tensor)."""
    x, r, w = (t.cuda() for t in _inputs((*lead, 2 * h if strided else h), dtype, seed))
    x, r, w = x[..., :h], r[..., :h], w[:h]
    assert x.stride(-2) == (2 * h if strided else h) and w.is_contiguous()
    return x, r, w


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("h", GPU_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_forward_matches_reference(dtype, h, strided):
    x, r, w = _cuda_inputs((4, 7), h, dtype, seed=h, strided=strided)
    # "norm": another fp32 summation order and the GPU's approximate rsqrt can move rstd by an fp32 ulp, which
    # the two roundings in fp16/bf16 can turn into 2 ulps of the output
    t = tol("norm", dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **t)
    out, new_res = fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)  # an fp32 sum rounded once: the dtype's add
    torch.testing.assert_close(out, ref_out, **t)
    assert recorder.implementations() == {"rms_norm": "triton", "fused_add_rms_norm": "triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("h", GPU_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backward_matches_reference(dtype, h, strided):
    """The Triton backward (through the C++ autograd kernels) by the rules of test_cpu_backward_odd_shapes, and
    bit-identical when run twice (fixed-order dweight reduction)."""
    x, r, w = _cuda_inputs((4, 7), h, dtype, seed=h + 1, strided=strided)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype).cuda()
    for ours_fn, ref_fn, ts in (
        (lambda a, c: rms_norm(a, c, 1e-6), lambda a, c: reference.rms_norm(a, c, 1e-6), (x, w)),
        (lambda a, b, c: fused_add_rms_norm(a, b, c, 1e-6), lambda a, b, c: reference.fused_add_rms_norm(a, b, c, 1e-6),
         (x, r, w)),
    ):
        ours = _norm_grads(ours_fn, ts, dy)
        assert all(torch.equal(a, b) for a, b in zip(ours, _norm_grads(ours_fn, ts, dy)))
        lowp = _norm_grads(ref_fn, ts, dy)
        ref32 = _norm_grads(ref_fn, [t.float() for t in ts], dy)
        for a, lo, hi in zip(ours, lowp, ref32):
            assert a.dtype == dtype and a.shape == lo.shape and a.is_cuda
            if dtype == torch.float32:
                torch.testing.assert_close(a, lo, rtol=1e-4, atol=1e-5)
            else:
                assert_within_twice_torch_error(a, hi, lo, floor=torch.finfo(dtype).eps * hi.abs().max().item() + 1e-6)
    assert recorder.implementations() == {"rms_norm": "triton", "fused_add_rms_norm": "triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("h", GPU_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_write_every_output(dtype, h):
    """The launchers on NaN-poisoned outputs (strided rows): every element is written. Forward against the
    reference; backward bit-identical to the op (the same launch), which test_cuda_backward_* checks."""
    from qwen3moe_kernels.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd

    x, r, w = _cuda_inputs((5,), h, dtype, seed=3, strided=True)
    dy = torch.randn(5, h, generator=torch.Generator().manual_seed(4)).to(dtype).cuda()

    def poisoned(*shape):
        return torch.full(shape, float("nan"), dtype=dtype, device="cuda")

    out = poisoned(5, h)
    rms_norm_fwd(x, None, w, 1e-6, out, None)
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-6), **tol("norm", dtype))
    out, new_res = poisoned(5, h), poisoned(5, h)
    rms_norm_fwd(x, r, w, 1e-6, out, new_res)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **tol("norm", dtype))
    dx, dw = poisoned(5, h), poisoned(h)
    rms_norm_bwd(dy, x, w, 1e-6, dx, dw)
    want_dx, want_dw = torch.ops.qwen3moe.rms_norm_backward(dy, x, w, 1e-6)
    assert torch.equal(dx, want_dx) and torch.equal(dw, want_dw)
