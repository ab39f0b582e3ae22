"""fused_moe (CPU path) against the reference sparse block: forward per dtype, backward vs autograd of the
reference, routing edge cases, and argument errors."""

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.ops.fused_moe import fused_moe

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _inputs(T, H, I, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    rw = torch.randn(E, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return x, rw, wgu, wd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 64, 48, 5, 2), (37, 83, 67, 7, 3), (20, 96, 40, 9, 9), (65, 128, 96, 60, 8)])
def test_forward_matches_reference(dtype, T, H, I, E, k):
    x, rw, wgu, wd = _inputs(T, H, I, E, dtype, seed=T)
    out, logits = fused_moe(x, rw, wgu, wd, k, True)
    ref, ref_logits = reference.sparse_moe_block(x.double(), rw.double(), wgu.double(), wd.double(), k, True)
    torch.testing.assert_close(logits.double(), reference.sparse_moe_block(x, rw, wgu, wd, k, True)[1].double())
    scale = max(1.0, ref.abs().max().item())
    assert (out.double() - ref).abs().max().item() <= TOL[dtype] * scale


def test_zero_tokens():
    x, rw, wgu, wd = _inputs(0, 64, 48, 5, torch.float32)
    out, logits = fused_moe(x, rw, wgu, wd, 2, False)
    assert out.shape == (0, 64) and logits.shape == (0, 5)


def test_all_tokens_one_expert():
    x, rw, wgu, wd = _inputs(19, 70, 45, 6, torch.float32)
    rw = torch.zeros_like(rw)
    rw[0] = 10.0
    x = x.abs() + 0.1  # every token's logit for expert 0 is the largest
    out, _ = fused_moe(x, rw, wgu, wd, 1, True)
    ref, _ = reference.sparse_moe_block(x, rw, wgu, wd, 1, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_backward_matches_reference_autograd():
    x, rw, wgu, wd = _inputs(23, 72, 40, 7, torch.float32)
    xs = [t.clone().requires_grad_() for t in (x, rw, wgu, wd)]
    rs = [t.clone().requires_grad_() for t in (x, rw, wgu, wd)]
    out, logits = fused_moe(*xs, 3, True)
    ref, ref_logits = reference.sparse_moe_block(*rs, 3, True)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in zip(xs, rs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    x, rw, wgu, wd = _inputs(4, 64, 48, 5, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x, rw, wgu, wd, 6, True)
    with pytest.raises(TypeError, match="w_down"):
        fused_moe(x, rw, wgu, wd.half(), 2, True)
    with pytest.raises(ValueError, match="w_gate_up"):
        fused_moe(x, rw, wgu[:, :, :10], wd, 2, True)
    with pytest.raises(ValueError, match="x must be"):
        fused_moe(x[None], rw, wgu, wd, 2, True)
