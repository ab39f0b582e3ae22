"""The experts' Triton path (``ops/grouped_swiglu_triton.py``: alignment, gather GEMMs, activation epilogues,
backward kernels, fixed-order sums), what the ops run on CUDA, here on CPU tensors: forward and backward against
autograd of ``reference.moe_experts`` in float64 for every activation, with small tiles, the shipped heuristic and
its prefill tiles; then the inference path, the whole passes against their parts, the sum kernel, what a forward
and a backward launch, and the per-slot buffers' dtype. (The ops' checks and autograd glue, shared by every device,
are tested on CPU in tests/test_grouped_swiglu.py and tests/test_fused_moe.py.)"""

import pytest
import torch

import triton_interp
from qwen3moe_kernels import reference
from qwen3moe_kernels.kernels import grouped_swiglu as kern
from qwen3moe_kernels.ops import grouped_swiglu_triton as tri
from qwen3moe_kernels.ops import moe_align_block, moe_unpermute
from tolerances import tol, twice_torch_error_bound

_default_config = kern.default_config
ACTIVATIONS = kern.ACTIVATIONS


def small_tiles(num_slots, kernel="gate_up", dtype="bf16", device_name=None, shape=None):
    """Tiles smaller than the test sizes, so the K loops, N tiles and row loops run several iterations."""
    if kernel == "wgrad":
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, "num_warps": 4, "num_stages": 2}


USED = []  # (kernel, config) of every launch while prefill_tiles is in place


def prefill_tiles(num_slots, kernel="gate_up", dtype="bf16", device_name=None, shape=None):
    """The heuristic's prefill tiles (its branch above 4096 slots) whatever the slot count, so they run at a
    small shape (BLOCK_M = 128 blocks, each expert's last one mostly padding)."""
    cfg = _default_config(1 << 20, kernel, dtype)
    USED.append((kernel, cfg))
    return cfg


TILES = {"small": small_tiles, "default": _default_config, "prefill": prefill_tiles}


def inputs(T, H, I, E, k, dtype, routing="topk", seed=0):
    """x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], ids and weights [T, k], dout [T, H]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    weights, ids = reference.router_topk(torch.randn(T, E, generator=g), k, True)
    if routing == "one_expert":  # every token's j-th choice is expert j: expert 0 holds all tokens
        ids = torch.arange(k, dtype=torch.int32).expand(T, k).contiguous()
    dout = torch.randn(T, H, generator=g).to(dtype)
    return x, wgu, wd, ids, weights, dout


def check(name, got, ref64, lowp_torch, dtype):
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element was never written)"
    if dtype == torch.float32:
        t = tol("gemm", dtype)
        torch.testing.assert_close(got, ref64, atol=t["atol"] * max(1.0, ref64.abs().max().item()), rtol=t["rtol"],
                                   msg=lambda m: f"{name}: {m}")
    else:
        # the flash-attention rule: at most twice PyTorch's own error in the same precision
        bound = twice_torch_error_bound(ref64, lowp_torch, factor=2.0, floor=1e-5 * max(1.0, ref64.abs().max().item()))
        err = (got - ref64).abs().max().item() if got.numel() else 0.0
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (2x torch's own {dtype} error)"


CASES = {
    # (T, H, I, E, k, routing, tiles); kept small: the interpreter runs every program in Python
    "one_token": (1, 64, 48, 5, 2, "topk", "small"),  # most experts get none
    "odd_sizes": (17, 83, 67, 7, 3, "topk", "small"),  # sizes not multiples of the tiles, E odd
    "heuristic": (37, 83, 67, 7, 3, "topk", "default"),  # the shipped heuristic (mid tiles at 111 slots)
    "k_equals_E": (12, 48, 40, 9, 9, "topk", "small"),  # every expert gets every token
    "one_expert": (11, 70, 45, 6, 2, "one_expert", "small"),  # all tokens on expert 0 (and 1)
    "E60_decode": (5, 32, 16, 60, 4, "topk", "default"),  # E not a power of two; most experts empty (decode tiles)
    # the prefill tiles (never picked below 4096 slots) at a small shape: ~67 slots per expert, so wgrad's slot
    # loop runs twice; H = 72 and I = 40 leave K and N tails
    "prefill_tiles": (100, 72, 40, 3, 2, "topk", "prefill"),
}


def triton_forward_backward(x, wgu, wd, ids, w, dout, activation="silu", need=(True, True, True)):
    """What moe_experts runs with a gradient, on the Triton path: the forward saving its activations, then the whole
    backward (weights rounded to x's dtype first, as moe_experts does in autograd). ``need``: dx, dW_gate_up, dW_down.
    Returns (out, dx, dw_gate_up, dw_down, d_weights)."""
    w = w.to(x.dtype).float()
    out, h, gu = tri.experts(x, wgu, wd, ids, w, True, activation)
    dx, dwgu, dwd, drw = tri.backward(dout, x, h, gu, wgu, wd, ids, w, *need, activation)
    return out, dx, dwgu, dwd, drw


def reference_grads(x, wgu, wd, ids, w, dout, activation="silu", dtype=None):
    """(out, dx, dw_gate_up, dw_down, d_weights) of autograd through reference.moe_experts in ``dtype``."""
    ts = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (x, wgu, wd, w)]
    out = reference.moe_experts(ts[0], ts[1], ts[2], ids, ts[3], activation)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in ts]


def check_all(got, dtype, x, wgu, wd, ids, w, dout, activation="silu"):
    """Every output against float64, fp16/bf16 within twice PyTorch's own error in that dtype."""
    ref64 = reference_grads(x, wgu, wd, ids, w, dout, activation, torch.float64)
    lowp = reference_grads(x, wgu, wd, ids, w, dout, activation) if dtype != torch.float32 else [None] * 5
    for name, a, b, c in zip(("out", "dx", "dw_gate_up", "dw_down", "dweights"), got, ref64, lowp):
        check(name, a, b, c, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(case, dtype, monkeypatch):
    T, H, I, E, k, routing, tiles = CASES[case]
    monkeypatch.setattr(kern, "default_config", TILES[tiles])
    USED.clear()
    x, wgu, wd, ids, w, dout = inputs(T, H, I, E, k, dtype, routing, seed=T * 131 + H + E)
    check_all(triton_forward_backward(x, wgu, wd, ids, w, dout), dtype, x, wgu, wd, ids, w, dout)
    if tiles == "prefill":  # the prefill tiles really ran, for every kernel
        assert {kn for kn, _ in USED} == set(kern.KERNELS), USED
        assert all(c["BLOCK_M"] == 128 for kn, c in USED if kn != "down_bwd"), USED  # 16-bit down_bwd: 64 x 64


@pytest.mark.parametrize("case", ["odd_sizes", "prefill_tiles"])
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "silu"])
def test_every_activation(activation, case, dtype, monkeypatch):
    """The gate_up and down_bwd epilogues of each activation (small tiles, and the prefill tiles' kernels)."""
    T, H, I, E, k, routing, tiles = CASES[case]
    monkeypatch.setattr(kern, "default_config", TILES[tiles])
    x, wgu, wd, ids, w, dout = inputs(T, H, I, E, k, dtype, routing, seed=T + 7)
    got = triton_forward_backward(x, wgu, wd, ids, w, dout, activation)
    check_all(got, dtype, x, wgu, wd, ids, w, dout, activation)


def test_deterministic(dtype):
    x, wgu, wd, ids, w, dout = inputs(23, 64, 40, 5, 3, dtype, seed=1)
    first, again = (triton_forward_backward(x, wgu, wd, ids, w, dout) for _ in range(2))
    for a, b in zip(first, again):
        assert torch.equal(a, b), "two runs differ: the kernels must be deterministic"


def test_frozen_experts(dtype):
    """Only x needs a gradient: the Triton backward skips the weight-gradient kernels, dx still matches."""
    x, wgu, wd, ids, w, dout = inputs(17, 48, 40, 6, 2, dtype, seed=2)
    _, dx, dwgu, dwd, _ = triton_forward_backward(x, wgu, wd, ids, w, dout, need=(True, False, False))
    ref64 = reference_grads(x, wgu, wd, ids, w, dout, dtype=torch.float64)
    lowp = reference_grads(x, wgu, wd, ids, w, dout)[1] if dtype != torch.float32 else None
    check("dx (frozen experts)", dx, ref64[1], lowp, dtype)
    assert dwgu.shape[0] == 0 and dwd.shape[0] == 0


def test_inference_path(dtype):
    """The no-grad path: gate_up with STORE_GU=False (no gate/up buffer) gives the same h, bit for bit, as with
    STORE_GU=True, and the forward matches the reference."""
    x, wgu, wd, ids, w, _ = inputs(21, 72, 40, 6, 3, dtype, seed=4)
    h_inf, empty = tri.gate_up(x, wgu, ids, False)[:2]
    h_train, gu = tri.gate_up(x, wgu, ids, True)[:2]
    assert empty.shape == (0, 80) and gu.shape == (63, 80)
    assert torch.isfinite(h_inf.double()).all() and torch.equal(h_inf, h_train), "STORE_GU=False changes h"
    out, h, gu = tri.experts(x, wgu, wd, ids, w, False)
    assert h.shape == (0, 40) and gu.shape == (0, 80)
    ref = reference.moe_experts(x.double(), wgu.double(), wd.double(), ids, w.double())
    check("out (no grad, STORE_GU=False)", out, ref, reference.moe_experts(x, wgu, wd, ids, w), dtype)


def test_whole_pass_ops_are_their_parts(dtype):
    """grouped_swiglu (the whole forward over one alignment) gives, bit for bit, what gate_up then down give, with
    and without saving the activations; the routing weights are rounded to x's dtype inside the kernels (fp32
    weights that bf16/fp16 cannot represent give the same result as the pre-rounded ones). The same for the whole
    backward against its two parts, for each set of gradients asked for."""
    x, wgu, wd, ids, w, dout = inputs(19, 72, 40, 7, 3, dtype, seed=8)
    w = w + 1e-3  # not representable in fp16/bf16
    h, gu = tri.gate_up(x, wgu, ids, True)[:2]
    want = tri.down(h, wd, ids, w.to(dtype).float())
    out, h2, gu2 = tri.experts(x, wgu, wd, ids, w, True)
    assert torch.equal(out, want) and torch.equal(h2, h) and torch.equal(gu2, gu), "experts != gate_up + down"
    out3, h3, gu3 = tri.experts(x, wgu, wd, ids, w, False)
    assert torch.equal(out3, want) and h3.shape == (0, 40) and gu3.shape == (0, 80)
    assert torch.equal(tri.down(h, wd, ids, w), want)  # down rounds the weights itself
    dgu, dwd, drw = tri.down_backward(dout, h, gu, wd, ids, w, True)[:3]
    dx, dwgu = tri.gate_up_backward(dgu, x, wgu, ids, True)
    for flags in ((True, True, True), (True, False, False), (False, True, True), (False, False, False)):
        got = tri.backward(dout, x, h, gu, wgu, wd, ids, w, *flags)
        for name, t, ref, need in zip(("dx", "dwgu", "dwd", "drw"), got, (dx, dwgu, dwd, drw), flags + (True,)):
            assert torch.equal(t, ref) if need else t.shape[0] == 0, (name, flags)


def test_sum_slots_kernel_is_moe_unpermute(dtype):
    """The sum_slots kernel is moe_unpermute with unit weights and the identity order, bit for bit: fp32, j = 0..k-1
    (values over six decades, so another order or accumulation dtype would differ); H not a multiple of its block."""
    T, k, H = 13, 8, 1100
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(T * k, H, generator=g) * torch.logspace(-3, 3, T * k)[:, None]).to(dtype)
    want = moe_unpermute(y, torch.ones(T, k), torch.arange(T * k, dtype=torch.int32))
    got = kern.sum_slots(y, k)
    assert got.dtype == dtype and torch.equal(got, want), "sum_slots kernel != moe_unpermute"


def test_launches(dtype, monkeypatch):
    """What the no-grad forward launches (the decode path on CUDA, where every launch counts against ~20 us of
    weight reads): one moe_align_block shared by both GEMMs, gate_up, down, the sum kernel; no moe_unpermute
    (its unit weights and identity order cost two more launches) and no second alignment. And the backward's."""
    calls = []

    def spy(mod, name):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, **kw: calls.append(name) or fn(*a, **kw))

    for name in ("moe_align_block", "moe_sort"):
        spy(tri, name)
    for name in ("gate_up", "down", "sum_slots", "down_bwd", "dx", "wgrad"):
        spy(kern, name)
    for T in (1, 5):
        x, wgu, wd, ids, w, dout = inputs(T, 64, 48, 6, 2, dtype, seed=9)
        calls.clear()
        out, h, gu = tri.experts(x, wgu, wd, ids, w, False)
        assert calls == ["moe_align_block", "gate_up", "down", "sum_slots"], (T, calls)
        # training: the backward aligns once for down_bwd and dx and sorts once for both weight gradients
        out, h, gu = tri.experts(x, wgu, wd, ids, w, True)
        calls.clear()
        tri.backward(dout, x, h, gu, wgu, wd, ids, w, True, True, True)
        assert calls == ["moe_align_block", "down_bwd", "moe_sort", "wgrad", "dx", "sum_slots", "wgrad"], calls


def test_per_slot_buffers_in_the_activations_dtype(dtype):
    """The down and dx kernels store their per-slot rows in the activations' dtype (fp32 only for fp32 inputs):
    half the bytes of an fp32 buffer for 16-bit models."""
    x, wgu, wd, ids, w, _ = inputs(9, 48, 40, 5, 2, dtype, seed=6)
    cfg = small_tiles(18)
    padded, be, _ = moe_align_block(ids, 5, cfg["BLOCK_M"])
    h, _ = kern.gate_up(x, wgu, padded, be, 2, cfg)
    y = kern.down(h, wd, w, padded, be, cfg)
    dxs = kern.dx(torch.randn(18, 80).to(dtype), wgu, padded, be, cfg)
    assert y.dtype == dtype and y.shape == (18, 48) and torch.isfinite(y.double()).all()
    assert dxs.dtype == dtype and dxs.shape == (18, 48) and torch.isfinite(dxs.double()).all()


def test_bf16_dot_shim_is_still_needed():
    """Documents why tests/triton_interp.py exists. When this fails, triton's interpreter computes bf16 tl.dot
    correctly: delete the shim (tests/triton_interp.py and the bf16_dot fixture) and run bf16 directly."""
    assert triton_interp.dot_defect_present(), (
        "triton's interpreter now computes bf16 tl.dot correctly: drop the test-only shim tests/triton_interp.py")
    assert triton_interp.shim_fixes_dot(), "the bf16 dot shim does not give an fp32 product"
    triton_interp.uninstall()
