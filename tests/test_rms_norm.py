"""qwen3moe::rms_norm / fused_add_rms_norm against reference.rms_norm (and transformers' Qwen3MoeRMSNorm): CPU
path, autograd (gradcheck; double backward refused), opcheck, compile, the Triton kernels under the interpreter
(in a subprocess so TRITON_INTERPRET is set before triton loads), and on a GPU when there is one."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from qwen3moe_kernels import dispatch, reference
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
    x, _, w = _inputs((4, 64), torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        rms_norm(x, w[:10], 1e-6)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        rms_norm(x, w, 0.0)
    with pytest.raises(RuntimeError, match="weight dtype"):
        rms_norm(x, w.half(), 1e-6)


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


_INTERP = textwrap.dedent(
    """
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from qwen3moe_kernels import reference
    from qwen3moe_kernels.kernels.rms_norm import rms_norm_fwd
    from qwen3moe_kernels.tolerances import tol
    def ntol(dtype):
        # bf16 under the interpreter: two truncating roundings (normed, then weight*normed) -> up to 2 ulps.
        return dict(rtol=2.0**-6, atol=1e-6) if dtype == torch.bfloat16 else tol("elementwise", dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, h in ((1, 2048), (3, 4096), (5, 769), (2, 7)):
            g = torch.Generator().manual_seed(rows * h)
            x = torch.randn(rows, 2 * h, generator=g).to(dtype)[:, :h]  # strided rows
            r = torch.randn(rows, h, generator=g).to(dtype)
            w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
            out = torch.full((rows, h), float("nan"), dtype=dtype)
            nr = torch.full((rows, h), float("nan"), dtype=dtype)
            rms_norm_fwd(x, None, w, 1e-6, out, None)
            torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-6), **ntol(dtype))
            out.fill_(float("nan"))
            rms_norm_fwd(x, r, w, 1e-6, out, nr)
            ro, rn = reference.fused_add_rms_norm(x, r, w, 1e-6)
            # The interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest): 1 bf16 ulp in bf16.
            exact = dict(rtol=2.0**-7, atol=0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
            torch.testing.assert_close(nr, rn, **exact)
            # the norm of the kernel's own residual (an ulp off in bf16 here) must match the reference's norm
            torch.testing.assert_close(out, reference.rms_norm(nr, w, 1e-6), **ntol(dtype))
    # backward kernel (+ the two-stage dweight reduction): strided rows, H = 769, T = 0 and 1, poisoned outputs
    from qwen3moe_kernels.kernels.rms_norm import rms_norm_bwd
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, h in ((0, 769), (1, 769), (5, 769), (3, 2048), (600, 64)):
            g = torch.Generator().manual_seed(rows + h)
            x = torch.randn(rows, 2 * h, generator=g).to(dtype)[:, :h]
            w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
            dy = torch.randn(rows, h, generator=g).to(dtype)
            dx = torch.full((rows, h), float("nan"), dtype=dtype)
            dw = torch.full((h,), float("nan"), dtype=dtype)
            rms_norm_bwd(dy, x, w, 1e-6, dx, dw)
            xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
            (reference.rms_norm(xf, wf, 1e-6) * dy.float()).sum().backward()
            bt = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(dx.float(), xf.grad, **bt)
            torch.testing.assert_close(dw.float(), wf.grad, **bt)
    # the CUDA implementations registered in ops/rms_norm.py (3-D input, strided rows), on CPU tensors here
    from qwen3moe_kernels.ops import rms_norm as ops_norm
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2 * 769, generator=g)[..., :769]
    r = torch.randn(2, 3, 769, generator=g)
    w = 1 + 0.1 * torch.randn(769, generator=g)
    e = tol("elementwise", torch.float32)
    torch.testing.assert_close(ops_norm._rms_norm_cuda(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **e)
    for a, b in zip(ops_norm._fused_add_rms_norm_cuda(x, r, w, 1e-6), reference.fused_add_rms_norm(x, r, w, 1e-6)):
        torch.testing.assert_close(a, b, **e)
    dy = torch.randn(2, 3, 769, generator=g)
    cpu = torch.ops.qwen3moe.rms_norm_backward(dy, x, w, 1e-6)
    for a, b in zip(ops_norm._rms_norm_backward_cuda(dy, x, w, 1e-6), cpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # empty inputs (H = 0, no rows): what the CPU kernels return (dweight zeros), nothing launched
    for shape in ((3, 0), (0, 5), (2, 0, 7)):
        x, w = torch.randn(shape), torch.randn(shape[-1])
        assert ops_norm._rms_norm_cuda(x, w, 1e-6).shape == x.shape
        assert [t.shape for t in ops_norm._fused_add_rms_norm_cuda(x, x, w, 1e-6)] == [x.shape, x.shape]
        cpu = torch.ops.qwen3moe.rms_norm_backward(x, x, w, 1e-6)
        for a, b in zip(ops_norm._rms_norm_backward_cuda(x, x, w, 1e-6), cpu):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # grad_out is checked as on CPU
    x, w = torch.randn(3, 8), torch.randn(8)
    for bad in (torch.randn(2, 8), torch.randn(3, 8).half()):
        try:
            ops_norm._rms_norm_backward_cuda(bad, x, w, 1e-6)
            raise AssertionError("bad grad_out accepted")
        except RuntimeError as err:
            assert "grad_out must match x in shape and dtype" in str(err), err
    print("OK")
    """
)


def test_triton_kernel_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


# ---------------------------------------------------------------------------------- GPU (skipped without one)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPU_HIDDEN = [2048, 4096, 769]  # Qwen3-30B-A3B, Qwen3-235B-A22B, and one that is not a power of two


def _cuda_inputs(lead, h, dtype, seed, strided):
    """x, residual [*lead, h] and weight [h] on the GPU; ``strided``: x and residual are views with row stride 2h
    (sliced on the GPU: ``.cuda()`` of a sliced CPU view would copy it to a contiguous tensor)."""
    x, r, w = (t.cuda() for t in _inputs((*lead, 2 * h if strided else h), dtype, seed))
    x, r, w = x[..., :h], r[..., :h], w[:h]
    assert x.stride(-2) == (2 * h if strided else h) and w.is_contiguous()
    return x, r, w


@needs_gpu
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
    assert dispatch.implementations() == {"rms_norm": "triton", "fused_add_rms_norm": "triton"}


@needs_gpu
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
    assert dispatch.implementations() == {"rms_norm": "triton", "fused_add_rms_norm": "triton"}


@needs_gpu
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
