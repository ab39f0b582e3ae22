"""The grouped-GEMM SwiGLU ops (``qwen3moe::grouped_swiglu_*``): CPU implementations against the reference,
``torch.library.opcheck``, argument errors; the kernels' compile specs against the heuristic; tuned tables (file
location, exact-shape / nearest-slot lookup, compile specs) and the tuner's mechanics under the interpreter; the
fixed-order fp32 k-slot combine. The Triton kernels under the interpreter: tests/interp/test_grouped_swiglu.py."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.cpu import cpu_compute_dtype
from qwen3moe_kernels.kernels import grouped_swiglu
from qwen3moe_kernels.ops import grouped_swiglu_cpu
from qwen3moe_kernels.ops.grouped_swiglu import ACTIVATIONS
from helpers import DEVICES, experts_inputs
from tolerances import tol

HERE = Path(__file__).parent
OPS = torch.ops.qwen3moe


def test_compile_specs_cover_kernels_and_dtypes():
    specs = grouped_swiglu.compile_specs()
    kernels = {s.kernel for s in specs if s.gemm}
    assert kernels == {"grouped_swiglu_gate_up_kernel", "grouped_swiglu_down_kernel", "grouped_swiglu_down_bwd_kernel",
                       "grouped_swiglu_dx_kernel", "grouped_swiglu_wgrad_kernel"}
    sums = [s for s in specs if s.kernel == "grouped_swiglu_sum_slots_kernel"]
    assert {s.extra["dtype"] for s in sums} == {"bf16", "fp16", "fp32"} and not any(s.gemm for s in sums)
    assert all(s.gemm for s in specs if s.kernel != "grouped_swiglu_sum_slots_kernel")
    for k in kernels:
        labels = [s.label for s in specs if s.kernel == k]
        for want in ("30B-A3B decode", "30B-A3B prefill", "235B-A22B decode", "235B-A22B prefill"):
            for dt in ("bf16", "fp16", "fp32"):
                assert any(lab.startswith(f"{want} {dt}") for lab in labels), (k, want, dt)


def test_m_blocks_bounds_the_used_blocks():
    """The gather GEMMs launch programs for m_blocks(...) M blocks only: every block that holds a slot must lie
    below it, for any routing. Checked against moe_align_block's real count on routings that fill the most blocks
    (each expert just past a multiple of BLOCK_M, or one slot per expert) and random ones."""
    from qwen3moe_kernels.ops.moe_permute import moe_align_block

    g = torch.Generator().manual_seed(0)
    for E, block_m in ((128, 16), (128, 64), (60, 128), (7, 16), (1, 16)):
        routings = []
        for T, k in ((1, 1), (1, min(8, E)), (3, min(8, E)), (64, min(8, E)), (999, min(4, E))):
            routings.append(torch.rand(T, E, generator=g).topk(k, dim=1).indices)
            routings.append(torch.arange(T * k).remainder(E).view(T, k))  # round robin: one slot per expert first
        # every expert gets block_m + 1 slots: two blocks each, the second almost empty
        routings.append(torch.arange(E).repeat_interleave(block_m + 1).view(-1, 1))
        for ids in routings:
            padded, be, num_padded = moe_align_block(ids.int(), E, block_m)
            used = int(num_padded) // block_m
            bound = grouped_swiglu.m_blocks(be.numel(), ids.numel(), E, block_m)
            assert used <= bound <= be.numel(), (E, block_m, tuple(ids.shape), used, bound)
            assert (be[bound:] == -1).all() and (be[:used] >= 0).all()
    assert grouped_swiglu.m_blocks(121, 8, 128, 16) == 9  # one decode token at Qwen3-30B-A3B: 9 of 121 blocks


def test_default_config_phases():
    dec, pre = grouped_swiglu.default_config(8), grouped_swiglu.default_config(8 * 4096, "down")
    assert dec["BLOCK_M"] == 16 and pre["BLOCK_M"] == 128 and pre["BLOCK_N"] == 128
    with pytest.raises(ValueError, match="unknown kernel"):
        grouped_swiglu.default_config(8, "nope")


# ----------------------------------------------------------------------------------------- CPU ops


def _ref_gate_up(x, wgu, ids):
    k = ids.shape[1]
    gu = torch.einsum("sh,sih->si", x.double().repeat_interleave(k, 0), wgu.double()[ids.reshape(-1).long()])
    return reference.swiglu(gu), gu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_match_reference(dtype):
    x, ids, w, wgu, wd = experts_inputs(29, 40, 24, 7, 3, dtype)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    h_ref, gu_ref = _ref_gate_up(x, wgu, ids)
    t = tol("gemm", dtype)
    torch.testing.assert_close(gu.double(), gu_ref, **t)
    torch.testing.assert_close(h.double(), h_ref, atol=2 * t["atol"], rtol=2 * t["rtol"])
    h2, empty = OPS.grouped_swiglu_gate_up(x, wgu, ids, False)
    assert torch.equal(h, h2) and empty.shape == (0, 48)
    out = OPS.grouped_swiglu_down(h, wd, ids, w)
    y = torch.einsum("si,shi->sh", h.double(), wd.double()[ids.reshape(-1).long()]).view(29, 3, 40)
    torch.testing.assert_close(out.double(), (y * w.double()[:, :, None]).sum(1), **t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_whole_forward_agrees_with_the_two_ops(dtype):
    """grouped_swiglu (the C++ kernel on CPU) gives what gate_up then down (the torch implementation) give, within
    the GEMM tolerance (h: one more rounding apart, the C++ kernel rounds act(gate) * up from its fp32 accumulators);
    the routing weights are rounded to x's dtype inside it (fp32 weights bf16 cannot hold give, bit for bit, what
    the pre-rounded ones give). The C++ kernel on every ISA path: tests/test_grouped_swiglu_cpu.py."""
    x, ids, w, wgu, wd = experts_inputs(23, 40, 24, 7, 3, dtype, seed=7)
    w = w + 1e-3
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    want = OPS.grouped_swiglu_down(h, wd, ids, w.to(dtype).float())
    out, h2, gu2 = OPS.grouped_swiglu(x, wgu, wd, ids, w, True)
    t = tol("gemm", dtype)
    torch.testing.assert_close(out, want, **t)
    torch.testing.assert_close(gu2, gu, **t)
    torch.testing.assert_close(h2, h, atol=2 * t["atol"], rtol=2 * t["rtol"])
    out3, h3, gu3 = OPS.grouped_swiglu(x, wgu, wd, ids.long(), w, False)
    assert torch.equal(out3, out) and h3.shape == (0, 24) and gu3.shape == (0, 48)
    # (in bf16, skipping the rounding changes most of these outputs: this equality would fail without it)
    assert torch.equal(OPS.grouped_swiglu(x, wgu, wd, ids, w.to(dtype).float(), False)[0], out)


def test_cpu_backward_ops_match_autograd():
    """down_backward and gate_up_backward against autograd of the same math in float64."""
    x, ids, w, wgu, wd = experts_inputs(31, 36, 20, 6, 2, torch.float32, seed=3)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    dout = torch.randn(31, 36, generator=torch.Generator().manual_seed(4))
    dgu, dwd, drw = OPS.grouped_swiglu_down_backward(dout, h, gu, wd, ids, w)
    dx, dwgu = OPS.grouped_swiglu_gate_up_backward(dgu, x, wgu, ids)
    r = [t.double().requires_grad_() for t in (x, w, wgu, wd)]
    ref = reference.moe_experts(r[0], r[2], r[3], ids, r[1])
    ref.backward(dout.double())
    for got, want in ((dx, r[0].grad), (drw, r[1].grad), (dwgu, r[2].grad), (dwd, r[3].grad)):
        torch.testing.assert_close(got.double(), want, **tol("gemm", torch.float32))
    unused = torch.ones(6, dtype=torch.bool)
    unused[ids.reshape(-1).long()] = False
    assert (dwd[unused] == 0).all() and (dwgu[unused] == 0).all()  # experts without tokens: zero gradient


FLAGS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, False, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_whole_backward_is_the_two_ops(dtype):
    """grouped_swiglu_backward (one grouping, d_gate_up kept in expert order) gives, bit for bit, down_backward then
    gate_up_backward, for every combination of the gradients asked for; the ones not asked for come back empty."""
    x, ids, w, wgu, wd = experts_inputs(21, 40, 24, 7, 3, dtype, seed=8)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    dout = torch.randn(21, 40, generator=torch.Generator().manual_seed(9)).to(dtype)
    dgu, dwd, drw = OPS.grouped_swiglu_down_backward(dout, h, gu, wd, ids, w)
    dx, dwgu = OPS.grouped_swiglu_gate_up_backward(dgu, x, wgu, ids)
    for need_dx, need_dwgu, need_dwd in FLAGS:
        got = OPS.grouped_swiglu_backward(dout, x, h, gu, wgu, wd, ids, w, need_dx, need_dwgu, need_dwd)
        for name, t, want, need in zip(("dx", "dwgu", "dwd", "drw"), got, (dx, dwgu, dwd, drw),
                                       (need_dx, need_dwgu, need_dwd, True)):
            if need:
                assert torch.equal(t, want), (name, need_dx, need_dwgu, need_dwd)
            else:
                assert t.shape[0] == 0, (name, tuple(t.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_grouped_mm_path_is_the_per_expert_loop(dtype, monkeypatch):
    """On CPU the expert products run as one torch._grouped_mm when the operands allow it (16-byte strides: every
    real shape) and as one torch.mm per expert otherwise; both give the same bits, forward and backward, with
    experts left empty (zero weight gradients); an odd shape takes the loop."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # with native bf16 the compute dtype is the input's, so the grouped path applies (else: the loop for bf16)
    grouped_expected = cpu_compute_dtype(dtype) == dtype

    def run():
        x, ids, w, wgu, wd = experts_inputs(21, 64, 32, 9, 2, dtype, seed=12)
        ids[ids == 4] = 5  # expert 4 gets no rows
        dout = torch.randn(21, 64, generator=torch.Generator().manual_seed(13)).to(dtype)
        out, h, gu = grouped_swiglu_cpu.experts(x, wgu, wd, ids, w, True)  # the torch forward (the reference)
        return [out, h, gu, *OPS.grouped_swiglu_backward(dout, x, h, gu, wgu, wd, ids, w)]

    grouped = run()
    assert bool(calls) == grouped_expected
    assert (grouped[4][4] == 0).all() and (grouped[5][4] == 0).all()  # dW of the empty expert
    calls.clear()
    monkeypatch.setattr(grouped_swiglu_cpu, "grouped_mm_fits", lambda *ts: False)
    loop = run()
    assert not calls
    for a, b in zip(grouped, loop):
        assert torch.equal(a, b)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, ids, w, wgu, wd = experts_inputs(5, 83, 33, 4, 2, dtype)  # rows of 83 elements: no 16-byte stride in any dtype
    grouped_swiglu_cpu.experts(x, wgu, wd, ids, w, False)
    assert not calls


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, ids, w, wgu, wd = (t.to(device) for t in experts_inputs(9, 32, 16, 5, 2, torch.float32, seed=5))
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    dout = torch.randn(9, 32, device=device)
    dgu = torch.randn(18, 32, device=device)
    samples = [
        (OPS.grouped_swiglu_gate_up, (x, wgu, ids, True)),
        (OPS.grouped_swiglu_gate_up, (x, wgu, ids.long(), False)),
        (OPS.grouped_swiglu_gate_up, (x[:0], wgu, ids[:0], True)),
        (OPS.grouped_swiglu_down, (h, wd, ids, w)),
        (OPS.grouped_swiglu, (x, wgu, wd, ids, w, True)),
        (OPS.grouped_swiglu, (x, wgu, wd, ids.long(), w, False)),
        (OPS.grouped_swiglu, (x[:0], wgu, wd, ids[:0], w[:0], True)),
        (OPS.grouped_swiglu_down_backward, (dout, h, gu, wd, ids, w)),
        (OPS.grouped_swiglu_gate_up_backward, (dgu, x, wgu, ids)),
        (OPS.grouped_swiglu_down_backward, (dout, h, gu, wd, ids, w, False)),
        (OPS.grouped_swiglu_gate_up_backward, (dgu, x, wgu, ids, False)),
        (OPS.grouped_swiglu_backward, (dout, x, h, gu, wgu, wd, ids, w)),
        (OPS.grouped_swiglu_backward, (dout, x, h, gu, wgu, wd, ids.long(), w, True, False, False)),
        (OPS.grouped_swiglu_backward, (dout, x, h, gu, wgu, wd, ids, w, False, True, False)),
        (OPS.grouped_swiglu_backward, (dout[:0], x[:0], h[:0], gu[:0], wgu, wd, ids[:0], w[:0])),
        (OPS.grouped_swiglu, (x, wgu, wd, ids, w, True, "gelu")),
        (OPS.grouped_swiglu_gate_up, (x, wgu, ids, False, "relu")),
        (OPS.grouped_swiglu_down_backward, (dout, h, gu, wd, ids, w, True, "gelu_tanh")),
        (OPS.grouped_swiglu_backward, (dout, x, h, gu, wgu, wd, ids, w, True, True, True, "gelu")),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_every_activation_forward_backward(activation, dtype):
    """The forward and the whole backward for each activation the kernels compute, against autograd of
    reference.moe_experts in float64 (fp32 by the gemm tolerance, bf16 within twice PyTorch's own bf16 error)."""
    x, ids, w, wgu, wd = experts_inputs(23, 40, 24, 7, 3, dtype, seed=31)
    dout = torch.randn(23, 40, generator=torch.Generator().manual_seed(32)).to(dtype)
    wr = w.to(dtype).float()
    out, h, gu = OPS.grouped_swiglu(x, wgu, wd, ids, w, True, activation)
    got = [out, *OPS.grouped_swiglu_backward(dout, x, h, gu, wgu, wd, ids, wr, True, True, True, activation)]
    _assert_like_float64_autograd(got, x, wgu, wd, ids, w, dout, activation)


def _assert_like_float64_autograd(got, x, wgu, wd, ids, w, dout, activation="silu"):
    """``got`` = [out, dx, dw_gate_up, dw_down, dweights] against autograd of reference.moe_experts in float64:
    fp32 by the gemm tolerance, 16-bit within twice PyTorch's own error at that dtype (+ a 1e-5 floor)."""
    from tolerances import twice_torch_error_bound

    def ref(cast):
        ts = [t.detach().to(cast or t.dtype).clone().requires_grad_() for t in (x, wgu, wd, w)]
        r = reference.moe_experts(ts[0], ts[1], ts[2], ids, ts[3], activation)
        r.backward(dout.to(r.dtype))
        return [r.detach(), ts[0].grad, ts[1].grad, ts[2].grad, ts[3].grad]

    r64, lowp = ref(torch.float64), ref(None)
    for name, a, b, c in zip(("out", "dx", "dw_gate_up", "dw_down", "dweights"), got, r64, lowp):
        assert a.shape == b.shape, name
        if x.dtype == torch.float32:
            torch.testing.assert_close(a.double(), b, **tol("gemm", x.dtype), msg=lambda m: f"{activation} {name}: {m}")
        else:
            bound = twice_torch_error_bound(b, c, floor=1e-5 * max(1.0, b.abs().max().item()))
            assert (a.double() - b).abs().max().item() <= bound, (activation, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, I", [(16, 1), (1, 8), (1, 1)])
def test_cpu_size_one_dims_forward_backward(H, I, dtype):
    """I = 1 or H = 1: operands of shape [S, 1] or [E, 1, 1], whose unit strides torch._grouped_mm refuses ("strides
    should be multiple of 16 bytes"), take the per-expert loop. The torch forward, the parts ops and the whole
    backward (what training runs) against autograd of reference.moe_experts in float64."""
    x, ids, w, wgu, wd = experts_inputs(9, H, I, 4, 2, dtype, seed=33)
    dout = torch.randn(9, H, generator=torch.Generator().manual_seed(34)).to(dtype)
    wr = w.to(dtype).float()
    out, h, gu = grouped_swiglu_cpu.experts(x, wgu, wd, ids, w, True)
    h2, gu2 = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    assert torch.equal(h2, h) and torch.equal(gu2, gu)
    assert torch.equal(OPS.grouped_swiglu_down(h, wd, ids, wr), out)
    got = [out, *OPS.grouped_swiglu_backward(dout, x, h, gu, wgu, wd, ids, wr, True, True, True)]
    _assert_like_float64_autograd(got, x, wgu, wd, ids, w, dout)


def test_activation_changes_the_result_and_unknown_names_are_refused():
    """A test that could not fail otherwise: each activation gives different outputs on the same inputs, and a name
    the kernels do not compute is a ValueError naming the choices."""
    x, ids, w, wgu, wd = experts_inputs(9, 32, 16, 5, 2, torch.float32, seed=4)
    outs = [OPS.grouped_swiglu(x, wgu, wd, ids, w, False, a)[0] for a in ACTIVATIONS]
    assert all(not torch.allclose(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])
    for op, args in ((OPS.grouped_swiglu, (x, wgu, wd, ids, w, False, "mish")),
                     (OPS.grouped_swiglu_gate_up, (x, wgu, ids, False, "swish"))):
        with pytest.raises(ValueError, match="activation must be one of"):
            op(*args)


def test_op_errors_name_the_argument():
    x, ids, w, wgu, wd = experts_inputs(4, 32, 16, 5, 2, torch.float32)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    cases = [
        (lambda: OPS.grouped_swiglu_gate_up(x.int(), wgu, ids, False), TypeError, "x must be float32/float16/bfloat16"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu.half(), ids, False), TypeError,
         "w_gate_up must have x's dtype torch.float32"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu[:, :, :8], ids, False), ValueError,
         r"w_gate_up must be \[E, 2I, H=32\]"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu.to("meta"), ids, False), ValueError,
         "w_gate_up is on meta, expected x's device cpu"),
        (lambda: OPS.grouped_swiglu_down(h, wd, ids.to("meta"), w), ValueError, "ids is on meta, expected"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids.float(), False), TypeError, "ids must be int32/int64"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids[:3], False), ValueError, r"ids must be \[T=4, top_k\]"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, torch.zeros(4, 6, dtype=torch.int32), False), ValueError,
         r"top_k \(ids.shape\[1\]\) must be in \[1, E=5\], got 6"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, torch.where(ids == ids[2, 1], 5, ids), False), ValueError,
         r"ids\[\d, \d\] = 5 is not an expert id in \[0, E=5\)"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids - 1 - ids.max(), False), ValueError, "is not an expert id"),
        (lambda: OPS.grouped_swiglu_down(h, wd, ids, w.double()), TypeError, "weights must be float32"),
        (lambda: OPS.grouped_swiglu_down(h[:5], wd, ids, w), ValueError, "h must have T\\*k = 8 rows"),
        (lambda: OPS.grouped_swiglu_down(h, wd.transpose(1, 2), ids, w), ValueError, r"h must be \[T\*k, I=32\]"),
        (lambda: OPS.grouped_swiglu_down_backward(x, h, gu[:, :4], wd, ids, w), ValueError, "gate_up must be"),
        (lambda: OPS.grouped_swiglu_gate_up_backward(gu[:3], x, wgu, ids), ValueError, "d_gate_up must be"),
        (lambda: OPS.grouped_swiglu(x, wgu, wd[:, :8], ids, w, False), ValueError,
         r"w_down must be \[E=5, H=32, I=16\]"),
        (lambda: OPS.grouped_swiglu(x, wgu, wd.half(), ids, w, False), TypeError,
         "w_down must have x's dtype torch.float32"),
        (lambda: OPS.grouped_swiglu(x, wgu, wd, ids, w[:, :1], False), ValueError, r"weights must be \[T=4, k=2\]"),
        (lambda: OPS.grouped_swiglu(x, wgu, wd, ids, w.half(), False), TypeError, "weights must be float32"),
        (lambda: OPS.grouped_swiglu(x, wgu, wd, ids + 5, w, False), ValueError, "is not an expert id in"),
        (lambda: OPS.grouped_swiglu_backward(x[:3], x, h, gu, wgu, wd, ids, w), ValueError,
         r"dout must be \[T=4, H=32\]"),
        (lambda: OPS.grouped_swiglu_backward(x, x, h, gu[:, :4], wgu, wd, ids, w), ValueError, "gate_up must be"),
        (lambda: OPS.grouped_swiglu_backward(x, x, h[:5], gu, wgu, wd, ids, w), ValueError,
         "h must have T\\*k = 8 rows"),
        (lambda: OPS.grouped_swiglu_backward(x, x, h, gu, wgu, wd[:, :8], ids, w), ValueError, "w_down must be"),
    ]
    for fn, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fn()


# ------------------------------------------------------------------------------------ configs and tables

SLOT_SWEEP = sorted({1 << i for i in range(17)} | {3, 7, 63, 65, 65 * 8 - 1, 4095, 4097, 12345, 65535})


def _spec_key(kernel, dtype, H, I, E, variant, cfg):
    """What identifies a compiled launch config: an activation other than SiLU is compiled at one model shape
    (the two shapes' ints fall in the same JIT classes, see compile_specs), so its key leaves the shape out."""
    shape = (H, I, E) if variant in ("", "+gu", "dWd", "dWgu") else None
    return kernel, dtype, shape, variant, tuple(sorted(cfg.items()))


def test_compile_specs_cover_every_heuristic_config():
    """Whatever default_config returns (no tuned table) at the two model shapes, for any slot count, kernel, dtype
    and activation, is compiled by compile_specs(), in every variant (gate_up with and without STORE_GU and
    down_bwd, each for every activation; both wgrads)."""
    keys = {_spec_key(s.extra["kernel"], s.extra["dtype"], s.extra["H"], s.extra["I"], s.extra["E"],
                      s.extra["variant"], s.extra["config"]) for s in grouped_swiglu.compile_specs() if s.gemm}
    missing = set()
    for model, (H, I, E) in grouped_swiglu.MODEL_SHAPES.items():
        for kernel in grouped_swiglu.KERNELS:
            for dt in ("bf16", "fp16", "fp32"):
                for slots in SLOT_SWEEP:
                    cfg = grouped_swiglu.default_config(slots, kernel, dt, None, (H, I, E))
                    for spec in grouped_swiglu.kernel_specs(kernel, dt, H, I, E, slots, cfg, "sweep"):
                        key = _spec_key(kernel, dt, H, I, E, spec.extra["variant"], spec.extra["config"])
                        if key not in keys:
                            missing.add((model, kernel, dt, spec.extra["variant"], slots, tuple(cfg.values())))
    assert not missing, f"default_config returns configs compile_specs() does not compile: {sorted(missing)[:10]}"
    assert grouped_swiglu.MODEL_SHAPES == {"30B-A3B": (2048, 768, 128), "235B-A22B": (4096, 1536, 128)}
    variants = {s.extra["variant"] for s in grouped_swiglu.compile_specs() if s.kernel.endswith("gate_up_kernel")}
    assert variants == {a + g for a in ("", "gelu", "gelu_tanh", "relu") for g in ("", "+gu")}, variants


def _entry(kernel, dtype, H, I, E, slots, cfg, top_k=8):
    return {"kernel": kernel, "dtype": dtype, "H": H, "I": I, "E": E, "top_k": top_k, "slots": slots, "config": cfg}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty configs/ directory in place of the package's, and an empty loader cache."""
    monkeypatch.setattr(grouped_swiglu, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(grouped_swiglu, "TUNED", {})
    return tmp_path


def test_tuned_table_exact_shape_nearest_slots(table_dir):
    a = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 8, "num_stages": 4}
    b = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    c = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    s30 = (2048, 768, 128)
    table = {"device": "Fake GPU 80GB",
             "entries": [_entry("gate_up", "bf16", *s30, slots, cfg) for slots, cfg in ((8, a), (32, b), (4096, c))]}
    path = grouped_swiglu.table_path("Fake GPU 80GB")
    assert path == table_dir / "grouped_swiglu_Fake_GPU_80GB.json"
    path.write_text(json.dumps(table))
    dc = grouped_swiglu.default_config
    # nearest in log2: 16 ties 8 and 32 (the smaller wins); 2^8.5 ~ 362.04 splits 32 and 4096
    for slots, want in ((1, a), (8, a), (16, a), (17, b), (64, b), (362, b), (363, c), (8192, c), (1 << 20, c)):
        assert dc(slots, "gate_up", "bf16", "Fake GPU 80GB", s30) == want, slots
    # another shape (a 30B table never applies to 235B), dtype, kernel, device, or no shape: the heuristic
    dev = "Fake GPU 80GB"
    for args in ((8, "gate_up", "bf16", dev, (4096, 1536, 128)), (8, "gate_up", "fp16", dev, s30),
                 (8, "down", "bf16", dev, s30), (8, "gate_up", "bf16", "Other GPU", s30),
                 (8, "gate_up", "bf16", dev, None), (8, "gate_up", "bf16", None, s30)):
        assert dc(*args) == dc(args[0], args[1], args[2]), args
    # compile_specs() compiles every config of every table in configs/
    keys = {s.jit_variant() for s in grouped_swiglu.compile_specs()}
    for e in table["entries"]:
        for spec in grouped_swiglu.kernel_specs("gate_up", "bf16", *s30, e["slots"], e["config"], "t"):
            assert spec.jit_variant() in keys, e
    assert any(s.label.startswith("tuned Fake_GPU_80GB") for s in grouped_swiglu.compile_specs())


def test_table_directory_is_what_setup_ships():
    """The loader reads kernels/configs/grouped_swiglu_<device>.json, which setup.py's package_data ships."""
    import fnmatch
    import re

    pkg = Path(grouped_swiglu.__file__).resolve().parent.parent
    assert grouped_swiglu.CONFIG_DIR == pkg / "kernels" / "configs"
    setup = (HERE.parent / "setup.py").read_text()
    patterns = re.search(r'package_data=\{"qwen3moe_kernels": \[([^\]]*)\]', setup).group(1)
    patterns = [x.strip().strip('"') for x in patterns.split(",") if x.strip()]
    rel = grouped_swiglu.table_path("NVIDIA H100 80GB HBM3").relative_to(pkg).as_posix()
    assert rel == "kernels/configs/grouped_swiglu_NVIDIA_H100_80GB_HBM3.json"
    assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), (rel, patterns)


def test_no_tuned_table_is_shipped_without_a_gpu_run():
    """Shipped tables come from GPU measurements only (an interpreter table says device "interpreter")."""
    for path in grouped_swiglu.shipped_tables():
        table = json.loads(path.read_text())
        assert table.get("device") not in (None, "interpreter") and table.get("entries"), path


def _load_tuner():
    return importlib.import_module("qwen3moe_kernels.tools.tune_grouped_swiglu")


def test_tuner_check_rejects_wrong_results():
    tuner = _load_tuner()
    want = torch.randn(6, 5)
    assert tuner.close("y", want + 1e-6, want, torch.float32) is None
    assert "non-finite" in tuner.close("y", torch.full_like(want, float("nan")), want, torch.float32)
    assert "elements off" in tuner.close("y", want * 1.1, want, torch.float32)
    assert "shape" in tuner.close("y", want[:3], want, torch.float32)


def test_tuner_tiny_interpret_writes_a_table_the_loader_uses(table_dir):
    """The tuner's mechanics without a GPU: sweep two candidates per kernel at one tiny shape, check each against
    the torch path, time it, write the JSON; the loader reads it back and default_config returns its entries."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "qwen3moe_kernels.tools.tune_grouped_swiglu", "--interpret", "--tiny",
                        "--out-dir", str(table_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = grouped_swiglu.table_path("interpreter")
    table = json.loads(path.read_text())
    assert table["device"] == "interpreter" and table["versions"]["triton"]
    assert {e["kernel"] for e in table["entries"]} == set(grouped_swiglu.KERNELS)
    for e in table["entries"]:
        assert (e["H"], e["I"], e["E"], e["top_k"], e["slots"], e["dtype"]) == (64, 32, 4, 2, 16, "fp32")
        assert len(e["candidates"]) == 2 and all(c["ms"] > 0 and c["error"] is None for c in e["candidates"])
        heuristic = grouped_swiglu._launch_opts(grouped_swiglu.default_config(16, e["kernel"], "fp32"))
        assert e["candidates"][0]["config"] == heuristic and e["heuristic_config"] == heuristic
        fastest = min(e["candidates"], key=lambda c: c["ms"])
        assert e["ms"] == fastest["ms"] and e["config"] == fastest["config"]
        assert grouped_swiglu.default_config(16, e["kernel"], "fp32", "interpreter", (64, 32, 4)) == e["config"]
    # an entry the heuristic would not pick is returned as well (so the tuned path, not the heuristic, answered)
    alt = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3, "num_warps": 2, "num_stages": 1}
    table["entries"][0]["config"] = alt
    path.write_text(json.dumps(table))
    grouped_swiglu.TUNED.clear()
    kernel = table["entries"][0]["kernel"]
    assert grouped_swiglu.default_config(16, kernel, "fp32", "interpreter", (64, 32, 4)) == alt
    assert grouped_swiglu.default_config(16, kernel, "fp32") != alt
    assert any(s.gemm and s.extra["config"] == alt and s.extra["H"] == 64 for s in grouped_swiglu.compile_specs())


def test_k_slot_combine_is_fixed_order_fp32():
    """The k-slot combine after the down and dx kernels: fp32 accumulation in the order j = 0..k-1, one rounding
    (an exact match with that loop; a bf16 accumulation or another order would differ). The CPU helper
    (moe_unpermute with unit weights, rows in any order given by inv) here; the Triton kernel, which must agree
    bit for bit, under the interpreter (tests/interp/test_grouped_swiglu.py)."""
    from qwen3moe_kernels.ops.moe_permute import sum_slots

    T, k, H = 37, 8, 96
    g = torch.Generator().manual_seed(0)
    base = torch.randn(T * k, H, generator=g) * torch.logspace(-3, 3, T * k)[:, None]
    perm = torch.randperm(T * k, generator=g).int()  # rows stored out of slot order: inv says where
    for dtype in (torch.float32, torch.bfloat16):
        ys = base.to(dtype)
        want = ys.view(T, k, H)[:, 0].float()
        for j in range(1, k):
            want = want + ys.view(T, k, H)[:, j].float()
        shuffled = torch.empty_like(ys)
        shuffled[perm.long()] = ys
        got = sum_slots(shuffled, T, k, perm)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype)), dtype
    rev = base.view(T, k, H).flip(1).reshape(T * k, H)
    ident = torch.arange(T * k, dtype=torch.int32)
    assert not torch.equal(sum_slots(rev, T, k, ident), sum_slots(base, T, k, ident))  # the order shows in fp32
