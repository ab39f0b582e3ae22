"""qwen3moe::rms_norm / fused_add_rms_norm against reference.rms_norm: CPU path, autograd, opcheck, compile,
and the Triton kernel under the interpreter (in a subprocess so TRITON_INTERPRET is set before triton loads)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen3moe_kernels import reference
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


def test_gradcheck_fp64_math():
    # fp64 is not an accepted dtype of the op; the backward math itself is checked via fp32 autograd above.
    x, r, w = _inputs((2, 17), torch.float32, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    out = rms_norm(x, w, 1e-5)
    (out.square().sum()).backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.rms_norm(xr, wr, 1e-5).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)


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


def _norm_grads(fn, tensors, dy):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
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
    print("OK")
    """
)


def test_triton_kernel_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    x, r, w = (t.cuda() for t in _inputs((4, 7, 2048), dtype))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **tol("elementwise", dtype))
    out, nr = fused_add_rms_norm(x, r, w, 1e-6)
    ro, rn = reference.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(nr, rn, rtol=0, atol=0)
    torch.testing.assert_close(out, ro, **tol("elementwise", dtype))
