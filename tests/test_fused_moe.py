"""fused_moe and moe_experts (CPU path) against the reference: forward per dtype, backward vs autograd of the
reference (fp32 tight, fp16/bf16 within twice PyTorch's own error), routing edge cases, torch.compile
(fullgraph) and argument errors; on a GPU, the Triton kernels at the real shapes (accuracy for decode, mid and
prefill tiles, and bitwise determinism). Without a GPU the Triton path runs in tests/test_grouped_swiglu.py under
the interpreter."""

import pytest
import torch

from qwen3moe_kernels import recorder, reference
from qwen3moe_kernels.ops import fused_moe, moe_experts
from qwen3moe_kernels.ops.grouped_swiglu import cpu_experts_impl
from tolerances import tol, twice_torch_error_bound

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
    ref, ref_logits = reference.fused_moe(x.double(), rw.double(), wgu.double(), wd.double(), k, True)
    torch.testing.assert_close(logits.double(), reference.fused_moe(x, rw, wgu, wd, k, True)[1].double())
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
    ref, _ = reference.fused_moe(x, rw, wgu, wd, 1, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_backward_matches_reference_autograd():
    x, rw, wgu, wd = _inputs(23, 72, 40, 7, torch.float32)
    xs = [t.clone().requires_grad_() for t in (x, rw, wgu, wd)]
    rs = [t.clone().requires_grad_() for t in (x, rw, wgu, wd)]
    out, logits = fused_moe(*xs, 3, True)
    ref, ref_logits = reference.fused_moe(*rs, 3, True)
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


def test_other_float_dtypes_run_the_reference_visibly():
    """float64 is a valid model dtype (transformers runs it); no kernel takes it: the reference runs, with a
    FallbackWarning, and implementations() says so."""
    x, rw, wgu, wd = _inputs(9, 32, 16, 5, torch.float64)
    with pytest.warns(recorder.FallbackWarning, match="fused_moe runs the pure-PyTorch reference"):
        out, logits = fused_moe(x, rw, wgu, wd, 2, True)
    ref, ref_logits = reference.fused_moe(x, rw, wgu, wd, 2, True)
    assert torch.equal(out, ref) and torch.equal(logits, ref_logits)
    assert recorder.implementations()["fused_moe"].startswith("reference (")
    w, ids = reference.router_topk(ref_logits, 2, True)
    with pytest.warns(recorder.FallbackWarning, match="moe_experts"):
        assert torch.equal(moe_experts(x, wgu, wd, ids, w), reference.moe_experts(x, wgu, wd, ids, w))


def _routed(T, H, I, E, k, dtype, seed=0):
    x, rw, wgu, wd = _inputs(T, H, I, E, dtype, seed)
    weights, ids = reference.router_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(seed + 1)), k, True)
    return x, ids, weights, wgu, wd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_moe_experts_forward_backward(dtype):
    """moe_experts against autograd of reference.moe_experts: fp32 tightly, fp16/bf16 within twice the error
    PyTorch's own computation of the reference makes in that dtype (both against float64)."""
    x, ids, w, wgu, wd = _routed(27, 56, 40, 9, 3, dtype, seed=7)
    dout = torch.randn(27, 56, generator=torch.Generator().manual_seed(8)).to(dtype)
    ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    out = moe_experts(ours[0], ours[2], ours[3], ids, ours[1])
    out.backward(dout)
    r64 = [t.double().requires_grad_() for t in (x, w, wgu, wd)]
    ref = reference.moe_experts(r64[0], r64[2], r64[3], ids, r64[1])
    ref.backward(dout.double())
    lowp = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    ref_lowp = reference.moe_experts(lowp[0], lowp[2], lowp[3], ids, lowp[1])
    ref_lowp.backward(dout)
    pairs = [("out", out, ref, ref_lowp)] + [(n, a.grad, b.grad, c.grad) for n, a, b, c in
                                             zip(("dx", "dweights", "dw_gate_up", "dw_down"), ours, r64, lowp)]
    for name, got, want, torch_lowp in pairs:
        assert got.dtype == torch_lowp.dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want.detach(), **tol("gemm", dtype), msg=lambda m: f"{name}: {m}")
        else:
            bound = twice_torch_error_bound(want.detach(), torch_lowp.detach(),
                                            floor=1e-5 * max(1.0, want.abs().max().item()))
            err = (got.double() - want).abs().max().item()
            assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("trainable", ["x", "w_down", "weights"])
def test_moe_experts_partial_grads(trainable):
    """Only some inputs need a gradient (frozen experts, frozen input): those gradients match the reference and
    the others stay None (the weight-gradient GEMMs are skipped)."""
    x, ids, w, wgu, wd = _routed(21, 40, 24, 7, 3, torch.float32, seed=12)
    names = ("x", "weights", "w_gate_up", "w_down")
    ours = dict(zip(names, (t.clone() for t in (x, w, wgu, wd))))
    refs = dict(zip(names, (t.double() for t in (x, w, wgu, wd))))
    ours[trainable].requires_grad_()
    refs[trainable].requires_grad_()
    out = moe_experts(ours["x"], ours["w_gate_up"], ours["w_down"], ids, ours["weights"])
    ref = reference.moe_experts(refs["x"], refs["w_gate_up"], refs["w_down"], ids, refs["weights"])
    dout = torch.randn(21, 40, generator=torch.Generator().manual_seed(13))
    out.backward(dout)
    ref.backward(dout.double())
    torch.testing.assert_close(ours[trainable].grad.double(), refs[trainable].grad, **tol("gemm", torch.float32))
    assert all(ours[n].grad is None for n in names if n != trainable)


def test_moe_experts_no_grad_matches_grad_path_and_records():
    x, ids, w, wgu, wd = _routed(16, 48, 32, 6, 2, torch.float32, seed=11)
    recorder.reset()
    with torch.no_grad():
        a = moe_experts(x, wgu, wd, ids, w)
    ran = recorder.implementations()
    assert ran["grouped_swiglu"] == ran["moe_experts"] == cpu_experts_impl()  # "cpu (<ISA path>)": the C++ kernel
    b = moe_experts(x.requires_grad_(), wgu, wd, ids.long(), w)
    assert torch.equal(a, b.detach())


def test_moe_experts_rounds_weights_like_transformers():
    """The routing weights are rounded to x's dtype first, as reference.moe_experts (and transformers) do."""
    x, ids, w, wgu, wd = _routed(12, 32, 16, 5, 2, torch.bfloat16, seed=2)
    w = w + 1e-3  # not representable in bf16
    got = moe_experts(x, wgu, wd, ids, w).double()
    want = moe_experts(x, wgu, wd, ids, w.bfloat16().float()).double()
    assert torch.equal(got, want)


def test_moe_experts_bad_inputs():
    x, ids, w, wgu, wd = _routed(4, 32, 16, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        moe_experts(x, wgu, wd, torch.zeros(4, 6, dtype=torch.int32), torch.ones(4, 6))
    with pytest.raises(ValueError, match="not an expert id"):
        moe_experts(x, wgu, wd, ids + 5, w)
    with pytest.raises(TypeError, match="ids must be int32/int64"):
        moe_experts(x, wgu, wd, ids.float(), w)
    with pytest.raises(ValueError, match="weights must have ids' shape"):
        moe_experts(x, wgu, wd, ids, w[:, :1])
    with pytest.raises(TypeError, match="weights must be a float"):
        moe_experts(x, wgu, wd, ids, ids)
    with pytest.raises(TypeError, match="w_gate_up must have x's dtype"):
        moe_experts(x, wgu.double(), wd, ids, w)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_experts(x, wgu, wd[:, :, :3], ids, w)


def test_torch_compile_fullgraph_cpu():
    """fused_moe (no grad) and moe_experts (forward + backward) trace into one graph each."""
    x, rw, wgu, wd = _inputs(13, 32, 16, 6, torch.float32, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(fused_moe, fullgraph=True)
    with torch.no_grad():
        out, logits = compiled(x, rw, wgu, wd, 2, True)
        ref, ref_logits = fused_moe(x, rw, wgu, wd, 2, True)
    torch.testing.assert_close(out, ref, **tol("gemm", torch.float32))
    torch.testing.assert_close(logits, ref_logits)
    _, ids, w, _, _ = _routed(13, 32, 16, 6, 2, torch.float32, seed=4)

    def loss(x, w, wgu, wd):
        return moe_experts(x, wgu, wd, ids, w).square().sum()

    ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    eager = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    torch.compile(loss, fullgraph=True)(*ours).backward()
    loss(*eager).backward()
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a.grad, b.grad, **tol("gemm", torch.float32))


@pytest.mark.parametrize("device", __import__("helpers").DEVICES)
@pytest.mark.parametrize("T", [1, 7, 83, 512, 1024, 4096])
def test_real_shapes_bf16_forward_backward(device, T):
    """bf16 against the fp32 reference, within twice PyTorch's own bf16 error (forward and every gradient). On
    CUDA (Triton kernels) at the Qwen3-30B-A3B expert shapes (H=2048, I=768, E=128, k=8): T = 1 and 7 run the
    decode tiles, 83 and 512 the mid tiles, 1024 (8192 slots) and 4096 (32768 slots) the prefill tiles. On CPU
    at a scaled-down shape (the reference's bf16 backward on CPU at the real shapes would take minutes)."""
    H, I, E, k = (2048, 768, 128, 8) if device == "cuda" else (128, 48, 12, 4)
    x, ids, w, wgu, wd = (t.to(device) for t in _routed(T, H, I, E, k, torch.bfloat16, seed=T))
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16().to(device)
    recorder.reset()
    ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    out = moe_experts(ours[0], ours[2], ours[3], ids, ours[1])
    out.backward(dout)
    assert recorder.implementations()["grouped_swiglu_backward"] == ("triton" if device == "cuda" else "cpu")
    r32 = [t.detach().float().clone().requires_grad_() for t in (x, w, wgu, wd)]
    ref = reference.moe_experts(r32[0], r32[2], r32[3], ids, r32[1])
    ref.backward(dout.float())
    lowp = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    ref_lowp = reference.moe_experts(lowp[0], lowp[2], lowp[3], ids, lowp[1])
    ref_lowp.backward(dout)
    for name, got, want, tl_ in [("out", out, ref, ref_lowp)] + [
            (n, a.grad, b.grad, c.grad) for n, a, b, c in zip(("dx", "dw", "dwgu", "dwd"), ours, r32, lowp)]:
        bound = twice_torch_error_bound(want.detach(), tl_.detach(), floor=1e-5 * max(1.0, want.abs().max().item()))
        err = (got.float() - want).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


GPU_SHAPES = {"30B-A3B": (2048, 768, 128, 8), "235B-A22B": (4096, 1536, 128, 8)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(GPU_SHAPES))
@pytest.mark.parametrize("T", [7, 1024])
def test_real_shapes_bf16_deterministic_cuda(model, T):
    """Two bf16 forward + backward runs of the fused experts at the real shapes (decode and prefill tiles) give
    bitwise-identical outputs and gradients: no atomics, fixed-order sums (the k-slot combines, the
    routing-weight gradient's per-tile parts, the per-expert weight gradients)."""
    H, I, E, k = GPU_SHAPES[model]
    g = torch.Generator(device="cuda").manual_seed(T + H)  # on the GPU: 235B's fp32 weights on CPU would be 10 GB

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    x, dout = randn(T, H), randn(T, H)
    wgu, wd = randn(E, 2 * I, H, scale=H**-0.5), randn(E, H, I, scale=I**-0.5)
    w, ids = reference.router_topk(torch.randn(T, E, generator=g, device="cuda"), k, True)
    runs = []
    for _ in range(2):
        # NaN-fill memory the caching allocator will hand out next, so an element a kernel leaves unwritten shows
        # up as non-finite (or as a difference) instead of repeating the previous run's value
        poison = torch.full((1 << 28,), float("nan"), device="cuda")
        del poison
        ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
        out = moe_experts(ours[0], ours[2], ours[3], ids, ours[1])
        out.backward(dout)
        runs.append([out.detach()] + [t.grad for t in ours])
    assert recorder.implementations()["grouped_swiglu_backward"] == "triton"
    for name, a, b in zip(("out", "dx", "dweights", "dw_gate_up", "dw_down"), *runs):
        assert torch.isfinite(a.float()).all(), name
        assert torch.equal(a, b), f"{name}: two runs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 512])
def test_fused_moe_cuda_graph_replay_cuda(T):
    """The no-grad block (router linear, router_topk, one alignment, gate_up, down, sum) is capturable into a CUDA
    graph (no host synchronisation anywhere) and a replay on new inputs copied into the captured input gives,
    bit for bit, what an eager call on those inputs gives: how a served model runs decode."""
    H, I, E, k = GPU_SHAPES["30B-A3B"]
    g = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    rw, wgu, wd = randn(E, H), randn(E, 2 * I, H, scale=H**-0.5), randn(E, H, I, scale=I**-0.5)
    static_x = randn(T, H)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused_moe(static_x, rw, wgu, wd, k, True)  # warm-up: Triton compiles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_logits = fused_moe(static_x, rw, wgu, wd, k, True)
        for _ in range(2):
            x = randn(T, H)
            static_x.copy_(x)
            graph.replay()
            want, want_logits = fused_moe(x, rw, wgu, wd, k, True)
            assert torch.equal(static_logits, want_logits)
            assert torch.isfinite(static_out.float()).all() and torch.equal(static_out, want)
