"""The RMSNorm Triton kernels (forward, fused add, backward with its two-stage dweight reduction) and the CUDA
registrations of ``ops/rms_norm.py``, on CPU tensors under the interpreter, against the reference."""

import importlib

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd
from tolerances import tol

ops_norm = importlib.import_module("qwen3moe_kernels.ops.rms_norm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ntol(dtype):
    # bf16 under the interpreter: two truncating roundings (normed, then weight*normed) -> up to 2 ulps.
    return dict(rtol=2.0**-6, atol=1e-6) if dtype == torch.bfloat16 else tol("elementwise", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", [(1, 2048), (3, 4096), (5, 769), (2, 7)])
def test_forward_and_fused_add(rows, h, dtype):
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", [(0, 769), (1, 769), (5, 769), (3, 2048), (600, 64)])
def test_backward(rows, h, dtype):
    """The backward kernel and the two-stage dweight reduction: strided rows, H = 769, T = 0 and 1."""
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


def test_cuda_registrations():
    """The CUDA implementations registered in ops/rms_norm.py (3-D input, strided rows), on CPU tensors here;
    empty inputs launch nothing and give what the CPU kernels give; grad_out is checked as on CPU."""
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
    for shape in ((3, 0), (0, 5), (2, 0, 7)):
        x, w = torch.randn(shape), torch.randn(shape[-1])
        assert ops_norm._rms_norm_cuda(x, w, 1e-6).shape == x.shape
        assert [t.shape for t in ops_norm._fused_add_rms_norm_cuda(x, x, w, 1e-6)] == [x.shape, x.shape]
        cpu = torch.ops.qwen3moe.rms_norm_backward(x, x, w, 1e-6)
        for a, b in zip(ops_norm._rms_norm_backward_cuda(x, x, w, 1e-6), cpu):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        ops_norm._rms_norm_backward_cuda(torch.randn(2, 8), x, w, 1e-6)
    with pytest.raises(TypeError, match="grad_out must have x's dtype"):
        ops_norm._rms_norm_backward_cuda(torch.randn(3, 8).half(), x, w, 1e-6)
