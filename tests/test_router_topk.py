"""Tests of qwen3moe.router_topk (ops/router_topk.py; csrc/router_topk*) against reference.router_topk.

Index outputs are compared tie-aware: our probabilities may differ from torch's softmax in the last ulp, so where
two experts' probabilities are within rounding of each other either order is a correct top-k; everywhere else the
ids must be exactly the reference's. Exact ties (equal logits, underflow to 0) must resolve to the lowest id, and
there the ids must equal the reference exactly.
"""

import pytest
import torch
from helpers import DEVICES, poison
from tolerances import tol

import qwen3moe_kernels as qk
from qwen3moe_kernels import reference
from qwen3moe_kernels.ops.router_topk import router_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_topk(logits, k, renormalize, w, ids):
    """Tie-aware comparison with the reference (see the module docstring)."""
    rw, rids = reference.router_topk(logits, k, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == rw.shape and ids.shape == rids.shape
    if logits.shape[0] == 0:
        return
    w, ids, rw, rids = w.cpu(), ids.cpu(), rw.cpu(), rids.cpu()
    probs = torch.softmax(logits.cpu().double(), dim=-1)
    # chosen ids are distinct and in range
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()
    mism = (ids != rids).any(dim=-1)
    if mism.any():
        # where the ids differ, the probabilities at the differing positions must be a near-tie
        p_ours = probs.gather(1, ids.long())[mism]
        p_ref = probs.gather(1, rids.long())[mism]
        assert torch.allclose(p_ours, p_ref, rtol=1e-6, atol=1e-9), "ids differ from the reference beyond a near-tie"
        assert mism.float().mean() < 0.01, "too many rows with near-ties: suspicious"
    torch.testing.assert_close(w, rw, **tol("router", logits.dtype), equal_nan=True)


CASES = [(T, E, k) for T in [0, 1, 7, 83, 4096] for E in [8, 60, 128, 256] for k in [1, 2, 8] if k <= E]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", CASES)
def test_matches_reference(device, T, E, k):
    dtype = DTYPES[(T + E + k) % 3]  # every dtype meets every size class without a full product
    logits = (torch.randn(T, E) * 2).to(device, dtype)
    for renormalize in (True, False):
        w, ids = router_topk(logits, k, renormalize)
        check_topk(logits, k, renormalize, w, ids)
    assert qk.implementations()["router_topk"] == ("cpu" if device == "cpu" else "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,k", [(512, 8), (512, 512), (60, 60), (33, 17), (160, 8), (1, 1)])
def test_large_and_odd(device, E, k):
    for dtype in DTYPES:
        logits = torch.randn(37, E).to(device, dtype)
        check_topk(logits, k, True, *router_topk(logits, k, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_pick_lowest_id(device, dtype):
    E, k = 60, 8
    # logits from a tiny set of values: many exactly equal probabilities in every row
    logits = torch.randint(0, 4, (257, E)).to(device, dtype)
    logits[0] = 0.0  # all experts tie: ids 0..k-1
    logits[1, 50:] = 5.0  # the top 10 tie: the lowest 8 of them
    w, ids = router_topk(logits, k, True)
    rw, rids = reference.router_topk(logits, k, True)
    assert torch.equal(ids.cpu(), rids.cpu())
    assert torch.equal(ids[0].cpu(), torch.arange(k, dtype=torch.int32))
    assert torch.equal(ids[1].cpu(), torch.arange(50, 58, dtype=torch.int32))
    torch.testing.assert_close(w, rw, **tol("router", dtype))
    # within a group of equal weights, ids ascend
    wc, ic = w.cpu(), ids.cpu()
    same = wc[:, 1:] == wc[:, :-1]
    assert (ic[:, 1:] > ic[:, :-1])[same].all()


@pytest.mark.parametrize("device", DEVICES)
def test_underflow_zeros_tie(device):
    # a spread of 200 makes most probabilities exactly 0: with k = E they all tie and must come lowest id first
    E = 8
    logits = torch.tensor([[0.0, -200, 150, -300, 10, -250, -220, 149]] * 3, device=device)
    w, ids = router_topk(logits, E, False)
    rw, rids = reference.router_topk(logits, E, False)
    assert torch.equal(ids.cpu(), rids.cpu())
    torch.testing.assert_close(w, rw, **tol("router", torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows(device, dtype):
    E, k = 60, 8
    logits = torch.randn(6, E)
    logits[0, 17] = float("nan")  # NaN anywhere: the whole row's softmax is NaN -> ids 0..k-1, NaN weights
    logits[1, :] = float("nan")
    logits[2, 5] = float("inf")  # inf - inf = NaN: same as a NaN row
    logits[3, :] = float("-inf")  # all -inf: NaN row too
    logits[4, :30] = float("-inf")  # partly -inf: those experts get probability 0
    logits = logits.to(device, dtype)
    for renormalize in (True, False):
        w, ids = router_topk(logits, k, renormalize)
        rw, rids = reference.router_topk(logits, k, renormalize)
        assert torch.equal(ids.cpu(), rids.cpu())
        torch.testing.assert_close(w.cpu(), rw.cpu(), **tol("router", dtype), equal_nan=True)
        assert torch.isnan(w[:4]).all() and not torch.isnan(w[4:]).any()
        assert torch.equal(ids[0].cpu(), torch.arange(k, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_out_variant_and_strided_rows(device):
    T, E, k = 83, 128, 8
    wide = torch.randn(T, E + 8, device=device)
    logits = wide[:, 3 : 3 + E]  # row stride E + 8, unaligned start: the scalar CUDA path
    w, ids = poison(torch.empty(T, k, device=device)), poison(torch.empty(T, k, dtype=torch.int32, device=device))
    got = router_topk(logits, k, True, out=(w, ids))
    assert got[0] is w and got[1] is ids
    check_topk(logits, k, True, w, ids)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x = torch.randn(4, 16, device=device)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        router_topk(x[0], 2, True)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        router_topk(x.to(torch.float64), 2, True)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        router_topk(x, 0, True)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        router_topk(x, 17, True)
    with pytest.raises(RuntimeError, match="must be in \\[1, 512\\]"):
        router_topk(torch.randn(2, 513, device=device), 2, True)
    with pytest.raises(RuntimeError, match="stride"):
        router_topk(torch.randn(16, 4, device=device).t(), 2, True)
    with pytest.raises(RuntimeError, match="out weights"):
        router_topk(x, 2, True, out=(torch.empty(4, 3, device=device), torch.empty(4, 2, dtype=torch.int32,
                                                                                      device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for T, E, k, dtype in [(0, 8, 2, torch.float32), (7, 60, 8, torch.bfloat16), (33, 128, 8, torch.float16)]:
        logits = torch.randn(T, E).to(device, dtype)
        torch.library.opcheck(torch.ops.qwen3moe.router_topk.default, (logits, k, True))
        w, ids = torch.empty(T, k, device=device), torch.empty(T, k, dtype=torch.int32, device=device)
        torch.library.opcheck(torch.ops.qwen3moe.router_topk.out, (logits, k, False), {"weights": w, "ids": ids})


def test_shared_row_code_on_cpu_is_deterministic():
    # parallel_for splits rows differently for different T: the same row must give the same bits everywhere
    logits = torch.randn(1000, 128)
    w1, i1 = router_topk(logits, 8, True)
    w2, i2 = router_topk(logits[500:501], 8, True)
    assert torch.equal(w1[500:501], w2) and torch.equal(i1[500:501], i2)


@pytest.mark.parametrize("device", DEVICES)
def test_exp_accuracy_and_subnormal_order(device):
    # two experts [0, x]: p1 = exp(x) / (1 + exp(x)) tests the shared exp (router_topk.h: exp_nonpos) to a few ulp,
    # relative, down to where exp(x) is subnormal; torch's float64 softmax is the truth
    x = torch.linspace(-103.0, 0.0, 4097)
    logits = torch.stack([torch.zeros_like(x), x], dim=1).to(device)
    w, ids = router_topk(logits, 2, False)
    truth = torch.softmax(logits.cpu().double(), -1).gather(1, ids.cpu().long())
    # subnormal results carry fewer significant bits: their order is checked separately below
    normal = truth > 1.2e-38
    rel_normal = ((w.cpu().double() - truth).abs() / truth)[normal].max().item()
    assert rel_normal < 4e-7, f"max relative error {rel_normal:.2e} on normal results"
    # distinct subnormal probabilities keep their order (and the reference's ids), down to exact underflow
    row = torch.tensor([[0.0, -90.0, -95.0, -100.0, -103.0, -110.0, -88.0, -200.0]], device=device)
    w, ids = router_topk(row, 8, False)
    rw, rids = reference.router_topk(row, 8, False)
    assert torch.equal(ids.cpu(), rids.cpu())
    assert (w[0, :6] > 0).all() and (w[0, 6:] == 0).all()
