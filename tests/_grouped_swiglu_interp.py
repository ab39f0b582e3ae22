"""Run under TRITON_INTERPRET=1 (set before triton is imported) by tests/test_grouped_swiglu.py in a subprocess.

With the interpreter on, the ``qwen3moe::grouped_swiglu_*`` ops run their Triton kernels on CPU tensors, so this
checks the whole Triton path (alignment, gather GEMMs, SwiGLU epilogues, backward kernels, fixed-order sums)
forward and backward against autograd of ``reference.moe_experts`` in float64, with small tiles, the shipped
heuristic, and its prefill tiles forced at a small shape; then the inference path (gate_up with STORE_GU=False),
the whole-forward op against the two GEMM ops, the sum kernel against moe_unpermute, what the no-grad forward
launches, and the per-slot buffers' dtype. Every ``torch.empty`` is poisoned (NaN / -7) so any output element a kernel
fails to write shows up.

Usage: python _grouped_swiglu_interp.py fp32 fp16 [bf16]   (bf16 needs the tests/triton_interp.py shim: pass
``--shim``). Prints one line per case and ``OK`` at the end.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3moe_kernels import dispatch, reference  # noqa: E402
from qwen3moe_kernels.kernels import grouped_swiglu as kern  # noqa: E402
from qwen3moe_kernels.ops.fused_moe import moe_experts  # noqa: E402
from qwen3moe_kernels.ops.moe_permute import moe_align_block  # noqa: E402
from tolerances import tol, twice_torch_error_bound  # noqa: E402

_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


torch.empty = _poisoned_empty

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_default_config = kern.default_config


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


def inputs(T, H, I, E, k, dtype, routing, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    weights, ids = reference.router_topk(torch.randn(T, E, generator=g), k, True)
    if routing == "one_expert":  # every token's j-th choice is expert j: expert 0 holds all tokens
        ids = torch.arange(k, dtype=torch.int32).expand(T, k).contiguous()
    dout = torch.randn(T, H, generator=g).to(dtype)
    return x, ids, weights, wgu, wd, dout


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


def run(T, H, I, E, k, dtype, routing="topk", tiles="default"):
    kern.default_config = TILES[tiles]
    USED.clear()
    x, ids, w, wgu, wd, dout = inputs(T, H, I, E, k, dtype, routing, seed=T * 131 + H + E)
    ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    out = moe_experts(ours[0], ids, ours[1], ours[2], ours[3])
    out.backward(dout)
    assert dispatch.implementations().get("grouped_swiglu_backward") == "triton"
    # float64 reference, and PyTorch's own computation in this dtype (the error scale for fp16/bf16)
    r64 = [t.double().requires_grad_() for t in (x, w, wgu, wd)]
    ref = reference.moe_experts(r64[0], ids, r64[1], r64[2], r64[3])
    ref.backward(dout.double())
    lowp = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    if dtype != torch.float32:
        ref_lowp = reference.moe_experts(lowp[0], ids, lowp[1], lowp[2], lowp[3])
        ref_lowp.backward(dout)
    else:
        ref_lowp = None
    check("out", out, ref.detach(), ref_lowp, dtype)
    for name, a, b, c in zip(("dx", "dweights", "dw_gate_up", "dw_down"), ours, r64, lowp):
        check(name, a.grad, b.grad, c.grad if ref_lowp is not None else None, dtype)
    kern.default_config = _default_config
    if tiles == "prefill":  # the prefill tiles really ran, for every kernel
        assert {k for k, _ in USED} == set(kern.KERNELS), USED
        assert all(c["BLOCK_M"] == 128 for k, c in USED if k != "down_bwd"), USED  # 16-bit down_bwd: 64 x 64
    print(f"ok T={T} H={H} I={I} E={E} k={k} {dtype} {routing} {tiles}")


def determinism(dtype):
    x, ids, w, wgu, wd, dout = inputs(23, 64, 40, 5, 3, dtype, "topk", seed=1)
    res = []
    for _ in range(2):
        ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
        out = moe_experts(ours[0], ids, ours[1], ours[2], ours[3])
        out.backward(dout)
        res.append([out.detach()] + [t.grad for t in ours])
    for a, b in zip(*res):
        assert torch.equal(a, b), "two runs differ: the kernels must be deterministic"


def frozen_experts(dtype):
    """Only x needs a gradient: the Triton backward skips the weight-gradient kernels, dx still matches."""
    x, ids, w, wgu, wd, dout = inputs(17, 48, 40, 6, 2, dtype, "topk", seed=2)
    xg = x.clone().requires_grad_()
    moe_experts(xg, ids, w, wgu, wd).backward(dout)
    x64 = x.double().requires_grad_()
    reference.moe_experts(x64, ids, w.double(), wgu.double(), wd.double()).backward(dout.double())
    lowp = None
    if dtype != torch.float32:
        lowp = x.clone().requires_grad_()
        reference.moe_experts(lowp, ids, w, wgu, wd).backward(dout)
        lowp = lowp.grad
    check("dx (frozen experts)", xg.grad, x64.grad, lowp, dtype)
    assert wgu.grad is None and wd.grad is None


def inference(dtype):
    """The no-grad path: gate_up with STORE_GU=False (no gate/up buffer) gives the same h, bit for bit, as with
    STORE_GU=True, and moe_experts matches the reference."""
    x, ids, w, wgu, wd, dout = inputs(21, 72, 40, 6, 3, dtype, "topk", seed=4)
    ops = torch.ops.qwen3moe
    dispatch.reset()
    h_inf, empty = ops.grouped_swiglu_gate_up(x, wgu, ids, False)
    assert dispatch.implementations().get("grouped_swiglu_gate_up") == "triton"
    h_train, gu = ops.grouped_swiglu_gate_up(x, wgu, ids, True)
    assert empty.shape == (0, 80) and gu.shape == (63, 80)
    assert torch.isfinite(h_inf.double()).all() and torch.equal(h_inf, h_train), "STORE_GU=False changes h"
    with torch.no_grad():
        out = moe_experts(x, ids, w, wgu, wd)
    ref = reference.moe_experts(x.double(), ids, w.double(), wgu.double(), wd.double())
    check("out (no grad, STORE_GU=False)", out, ref, reference.moe_experts(x, ids, w, wgu, wd), dtype)
    print(f"ok inference {dtype}")


def composite(dtype):
    """grouped_swiglu (the whole forward over one alignment) gives, bit for bit, what gate_up then down give, with
    and without saving the activations; the routing weights are rounded to x's dtype inside the kernels (fp32
    weights that bf16/fp16 cannot represent give the same result as the pre-rounded ones)."""
    x, ids, w, wgu, wd, dout = inputs(19, 72, 40, 7, 3, dtype, "topk", seed=8)
    w = w + 1e-3  # not representable in fp16/bf16
    ops = torch.ops.qwen3moe
    h, gu = ops.grouped_swiglu_gate_up(x, wgu, ids, True)
    want = ops.grouped_swiglu_down(h, wd, ids, w.to(dtype).float())
    out, h2, gu2 = ops.grouped_swiglu(x, wgu, wd, ids, w, True)
    assert torch.equal(out, want) and torch.equal(h2, h) and torch.equal(gu2, gu), "grouped_swiglu != gate_up + down"
    out3, h3, gu3 = ops.grouped_swiglu(x, wgu, wd, ids, w, False)
    assert torch.equal(out3, want) and h3.shape == (0, 40) and gu3.shape == (0, 80)
    assert torch.equal(ops.grouped_swiglu_down(h, wd, ids, w), want)  # down rounds the weights itself
    # the whole backward against its two parts, for each set of gradients asked for
    dgu, dwd, drw = ops.grouped_swiglu_down_backward(dout, h, gu, wd, ids, w)
    dx, dwgu = ops.grouped_swiglu_gate_up_backward(dgu, x, wgu, ids)
    for flags in ((True, True, True), (True, False, False), (False, True, True), (False, False, False)):
        got = ops.grouped_swiglu_backward(dout, x, h, gu, wgu, wd, ids, w, *flags)
        for name, t, ref, need in zip(("dx", "dwgu", "dwd", "drw"), got, (dx, dwgu, dwd, drw), flags + (True,)):
            assert torch.equal(t, ref) if need else t.shape[0] == 0, (name, flags)
    print(f"ok grouped_swiglu(_backward) {dtype}")


def sum_slots_kernel(dtype):
    """The sum_slots kernel is moe_unpermute with unit weights and the identity order, bit for bit: fp32, j = 0..k-1
    (values over six decades, so another order or accumulation dtype would differ); H not a multiple of its block."""
    from qwen3moe_kernels.ops.moe_permute import moe_unpermute

    T, k, H = 13, 8, 1100
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(T * k, H, generator=g) * torch.logspace(-3, 3, T * k)[:, None]).to(dtype)
    want = moe_unpermute(y, torch.ones(T, k), torch.arange(T * k, dtype=torch.int32))
    got = kern.sum_slots(y, k)
    assert got.dtype == dtype and torch.equal(got, want), "sum_slots kernel != moe_unpermute"


def launches(dtype):
    """What the no-grad forward launches (the decode path on CUDA, where every launch counts against ~20 us of
    weight reads): one moe_align_block shared by both GEMMs, gate_up, down, the sum kernel; no moe_unpermute
    (its unit weights and identity order cost two more launches) and no second alignment. And the backward's."""
    from qwen3moe_kernels.ops import grouped_swiglu as gs

    calls = []

    def spy(mod, name):
        fn = getattr(mod, name)

        def wrapped(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return fn, wrapped

    patched = [(gs, n) for n in ("moe_align_block", "moe_sort", "moe_permute", "moe_unpermute")]
    patched += [(kern, n) for n in ("gate_up", "down", "sum_slots", "down_bwd", "dx", "wgrad")]
    originals = []
    for mod, name in patched:
        fn, wrapped = spy(mod, name)
        originals.append((mod, name, fn))
        setattr(mod, name, wrapped)
    try:
        for T in (1, 5):
            x, ids, w, wgu, wd, dout = inputs(T, 64, 48, 6, 2, dtype, "topk", seed=9)
            calls.clear()
            with torch.no_grad():
                moe_experts(x, ids, w, wgu, wd)
            assert calls == ["moe_align_block", "gate_up", "down", "sum_slots"], (T, calls)
            # training: the backward aligns once for down_bwd and dx and sorts once for both weight gradients
            ours = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
            out = moe_experts(ours[0], ids, *ours[1:])
            calls.clear()
            out.backward(dout)
            assert calls == ["moe_align_block", "down_bwd", "moe_sort", "wgrad", "dx", "sum_slots", "wgrad"], calls
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    print(f"ok launches {dtype}")


def per_slot_buffers(dtype):
    """The down and dx kernels store their per-slot rows in the activations' dtype (fp32 only for fp32 inputs):
    half the bytes of an fp32 buffer for 16-bit models."""
    x, ids, w, wgu, wd, dout = inputs(9, 48, 40, 5, 2, dtype, "topk", seed=6)
    cfg = small_tiles(18)
    padded, be, _ = moe_align_block(ids, 5, cfg["BLOCK_M"])
    h, _ = kern.gate_up(x, wgu, padded, be, 2, cfg)
    y = kern.down(h, wd, w, padded, be, cfg)
    dxs = kern.dx(torch.randn(18, 80).to(dtype), wgu, padded, be, cfg)
    assert y.dtype == dtype and y.shape == (18, 48) and torch.isfinite(y.double()).all()
    assert dxs.dtype == dtype and dxs.shape == (18, 48) and torch.isfinite(dxs.double()).all()


CASES = [
    # (T, H, I, E, k, routing, tiles); kept small: the interpreter runs every program in Python
    (1, 64, 48, 5, 2, "topk", "small"),  # one token: most experts get none
    (17, 83, 67, 7, 3, "topk", "small"),  # sizes not multiples of the tiles, E odd
    (37, 83, 67, 7, 3, "topk", "default"),  # the shipped heuristic (mid tiles at 111 slots)
    (12, 48, 40, 9, 9, "topk", "small"),  # k == E: every expert gets every token
    (11, 70, 45, 6, 2, "one_expert", "small"),  # all tokens on expert 0 (and 1)
    (5, 32, 16, 60, 4, "topk", "default"),  # E = 60, not a power of two; most experts empty (decode tiles)
    # the prefill tiles (never picked below 4096 slots) at a small shape: ~67 slots per expert, so wgrad's
    # slot loop runs twice; H = 72 and I = 40 leave K and N tails
    (100, 72, 40, 3, 2, "topk", "prefill"),
]

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--shim" in sys.argv:
        import triton_interp

        print("bf16 dot defect present:", triton_interp.dot_defect_present())
        assert triton_interp.shim_fixes_dot(), "the bf16 dot shim does not give an fp32 product"
        triton_interp.install()
    for name in args or ["fp32", "fp16"]:
        dtype = DTYPES[name]
        for T, H, I, E, k, routing, tiles in CASES:
            run(T, H, I, E, k, dtype, routing, tiles)
        determinism(dtype)
        frozen_experts(dtype)
        inference(dtype)
        composite(dtype)
        sum_slots_kernel(dtype)
        launches(dtype)
        per_slot_buffers(dtype)
    print("OK")
    sys.exit(0)
