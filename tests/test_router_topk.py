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
from qwen3moe_kernels import recorder, reference
from qwen3moe_kernels.ops.router_topk import router_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_topk(logits, k, renormalize, w, ids, ref=None, exact=False):
    """Comparison with the reference (tie-aware, see the module docstring; ``exact``: ids must equal it exactly).

    ``ref`` is the reference's ``(weights, ids)`` when the caller already has it (``reference_prefix``).
    """
    rw, rids = reference.router_topk(logits, k, renormalize) if ref is None else ref
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == rw.shape and ids.shape == rids.shape
    if logits.shape[0] == 0:
        return
    w, ids, rw, rids = w.cpu(), ids.cpu(), rw.cpu(), rids.cpu()
    # chosen ids are distinct and in range
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()
    mism = (ids != rids).any(dim=-1)
    if exact:
        assert not mism.any(), f"ids differ from the reference in {int(mism.sum())} rows"
    elif mism.any():
        # where the ids differ, the probabilities at the differing positions must be a near-tie
        probs = torch.softmax(logits.cpu().double(), dim=-1)
        p_ours = probs.gather(1, ids.long())[mism]
        p_ref = probs.gather(1, rids.long())[mism]
        assert torch.allclose(p_ours, p_ref, rtol=1e-6, atol=1e-9), "ids differ from the reference beyond a near-tie"
        assert mism.float().mean() < 0.01, "too many rows with near-ties: suspicious"
    torch.testing.assert_close(w, rw, **tol("router", logits.dtype), equal_nan=True)


def reference_prefix(full, k, renormalize):
    """``reference.router_topk(logits, k, renormalize)`` from ``full = reference.router_topk(logits, E, False)``.

    The reference sorts the whole row whatever k is, then slices and renormalises; doing the slice and the
    division here on the one sort is the same computation (``test_reference_prefix_is_the_reference`` checks the
    bits), so the grid below sorts each big logits tensor once instead of once per (k, renormalize).
    """
    w, ids = full[0][:, :k], full[1][:, :k]
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.contiguous(), ids.contiguous()


def poisoned_out(T, k, device):
    return poison(torch.empty(T, k, device=device)), poison(torch.empty(T, k, dtype=torch.int32, device=device))


GRID_T = [0, 1, 7, 83, 4096, 65536]
GRID_E = [8, 60, 128, 256]
GRID_K = [1, 2, 8]
MODES = ["randn", "ties", "one_expert"]


def grid_logits(T, E, mode):
    """randn: distinct probabilities (near-ties only by rounding). ties: logits in {0, 1, 2, 3}, so every row has
    many exactly equal probabilities. one_expert: expert E // 3 is 200 above the rest for every token, so all
    tokens choose it with weight 1 and every other probability underflows to exactly 0 (a tie: lowest ids next)."""
    if mode == "randn":
        return torch.randn(T, E) * 2
    if mode == "ties":
        return torch.randint(0, 4, (T, E)).float()
    logits = torch.randn(T, E)
    logits[:, E // 3] += 200.0
    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("E", GRID_E)
@pytest.mark.parametrize("T", GRID_T)
def test_matches_reference(device, T, E, mode):
    # the grid of the issue: T x E x k (looped here, sharing one reference sort) x {random, exact ties, all tokens
    # to one expert}; renormalize through the functional op, not renormalize through the out variant into
    # poisoned buffers
    dtype = DTYPES[(T + E + MODES.index(mode)) % 3]  # every dtype meets every (T, E) without a full product
    logits = grid_logits(T, E, mode).to(device, dtype)
    full = reference.router_topk(logits, E, False)
    for k in GRID_K:
        for renormalize in (True, False):
            if renormalize:
                w, ids = router_topk(logits, k, renormalize)
            else:
                w, ids = poisoned_out(T, k, device)
                got = router_topk(logits, k, renormalize, out=(w, ids))
                assert got[0] is w and got[1] is ids
            check_topk(logits, k, renormalize, w, ids, ref=reference_prefix(full, k, renormalize),
                       exact=mode != "randn")
            if mode == "one_expert" and T:
                others = [e for e in range(E) if e != E // 3][: k - 1]
                want = torch.tensor([E // 3] + others, dtype=torch.int32).expand(T, k)
                assert torch.equal(ids.cpu(), want)
                assert (w[:, 0] == 1).all() and (w[:, 1:] == 0).all()
    assert qk.implementations()["router_topk"] == ("cpu" if device == "cpu" else "cuda")


def test_reference_prefix_is_the_reference():
    # the shortcut of the grid above gives the reference's bits (a NaN row included)
    logits = torch.randn(300, 60) * 2
    logits[7, 3] = float("nan")
    full = reference.router_topk(logits, 60, False)
    for k in (1, 2, 8, 40, 60):
        for renormalize in (True, False):
            w, ids = reference_prefix(full, k, renormalize)
            rw, rids = reference.router_topk(logits, k, renormalize)
            assert torch.equal(ids, rids)
            torch.testing.assert_close(w, rw, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,k", [(512, 8), (512, 512), (60, 60), (33, 17), (160, 8), (1, 1)])
def test_large_and_odd(device, E, k):
    for dtype in DTYPES:
        logits = torch.randn(37, E).to(device, dtype)
        check_topk(logits, k, True, *router_topk(logits, k, True))


# k <= 32 selects on the floats (select_topk_row), k > 32 with the GPU's 64-bit keys (topk_key, select_topk_passes):
# the tie, zero and NaN tests below run both on CPU (see csrc/router_topk_cpu.cpp)
TIE_KS = [8, 40, 60]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", TIE_KS)
def test_exact_ties_pick_lowest_id(device, dtype, k):
    E = 60
    # logits from a tiny set of values: many exactly equal probabilities in every row
    logits = torch.randint(0, 4, (257, E)).to(device, dtype)
    logits[0] = 0.0  # all experts tie: ids 0..k-1
    logits[1, 50:] = 5.0  # the top 10 tie: the lowest of them first
    w, ids = poisoned_out(257, k, device)
    router_topk(logits, k, True, out=(w, ids))
    rw, rids = reference.router_topk(logits, k, True)
    assert torch.equal(ids.cpu(), rids.cpu())
    assert torch.equal(ids[0].cpu(), torch.arange(k, dtype=torch.int32))
    top = min(k, 10)
    assert torch.equal(ids[1, :top].cpu(), torch.arange(50, 50 + top, dtype=torch.int32))
    torch.testing.assert_close(w, rw, **tol("router", dtype))
    # within a group of equal weights, ids ascend
    wc, ic = w.cpu(), ids.cpu()
    same = wc[:, 1:] == wc[:, :-1]
    assert same.sum() > 257  # the groups are really there
    assert (ic[:, 1:] > ic[:, :-1])[same].all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E", [8, 40])
def test_underflow_zeros_tie(device, E):
    # a spread of 450 makes most probabilities exactly 0: with k = E they all tie and must come lowest id first;
    # E = 40 (the key path) repeats the pattern, so equal nonzero probabilities (the 150s, the 149s) tie too
    logits = torch.tensor([[0.0, -200, 150, -300, 10, -250, -220, 149] * (E // 8)] * 3, device=device)
    w, ids = poisoned_out(3, E, device)
    router_topk(logits, E, False, out=(w, ids))
    rw, rids = reference.router_topk(logits, E, False)
    assert torch.equal(ids.cpu(), rids.cpu())
    torch.testing.assert_close(w, rw, **tol("router", torch.float32))
    # only 150 and 149 survive (149 - 150 = -1); everything else is > 104 below the max: exactly 0
    n = 2 * (E // 8)
    assert (w[:, :n] > 0).all() and (w[:, n:] == 0).all()
    tied = [e for e in range(E) if e % 8 not in (2, 7)]
    assert torch.equal(ids[:, n:].cpu(), torch.tensor(tied, dtype=torch.int32).expand(3, E - n))
    # equal nonzero probabilities: the 150s by ascending id, then the 149s
    nonzero = [e for e in range(E) if e % 8 == 2] + [e for e in range(E) if e % 8 == 7]
    assert torch.equal(ids[:, :n].cpu(), torch.tensor(nonzero, dtype=torch.int32).expand(3, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", TIE_KS)
def test_nan_and_inf_rows(device, dtype, k):
    E = 60
    logits = torch.randn(6, E)
    logits[0, 17] = float("nan")  # NaN anywhere: the whole row's softmax is NaN -> ids 0..k-1, NaN weights
    logits[1, :] = float("nan")
    logits[2, 5] = float("inf")  # inf - inf = NaN: same as a NaN row
    logits[3, :] = float("-inf")  # all -inf: NaN row too
    logits[4, :30] = float("-inf")  # partly -inf: those experts get probability 0 (after the 30 others)
    logits = logits.to(device, dtype)
    for renormalize in (True, False):
        w = torch.full((6, k), 7.0, device=device)  # not NaN: the NaN weights must be written
        ids = poison(torch.empty(6, k, dtype=torch.int32, device=device))
        router_topk(logits, k, renormalize, out=(w, ids))
        rw, rids = reference.router_topk(logits, k, renormalize)
        assert torch.equal(ids.cpu(), rids.cpu())
        torch.testing.assert_close(w.cpu(), rw.cpu(), **tol("router", dtype), equal_nan=True)
        assert torch.isnan(w[:4]).all() and not torch.isnan(w[4:]).any()
        assert torch.equal(ids[:4].cpu(), torch.arange(k, dtype=torch.int32).expand(4, k))
        if k > 30:
            assert (w[4, 30:] == 0).all()
            assert torch.equal(ids[4, 30:].cpu(), torch.arange(k - 30, dtype=torch.int32))


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
    op = torch.ops.qwen3moe.router_topk
    for fn in (router_topk, op):
        with pytest.raises(ValueError, match="logits must be 2-D"):
            fn(x[0], 2, True)
        with pytest.raises(ValueError, match="top_k must be in"):
            fn(x, 0, True)
        with pytest.raises(ValueError, match="top_k must be in"):
            fn(x, 17, True)
        with pytest.raises(ValueError, match="stride"):
            fn(torch.randn(16, 4, device=device).t(), 2, True)
    # what only the op refuses: the function runs the reference for these (test_unsupported_logits_...)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        op(x.to(torch.float64), 2, True)
    with pytest.raises(ValueError, match="must be in \\[1, 512\\]"):
        op(torch.randn(2, 513, device=device), 2, True)
    with pytest.raises(ValueError, match="out weights"):
        router_topk(x, 2, True, out=(torch.empty(4, 3, device=device), torch.empty(4, 2, dtype=torch.int32,
                                                                                      device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_logits_run_the_reference_visibly(device):
    """float64 logits and more than 512 experts are valid router inputs no kernel takes: the reference's result,
    with a FallbackWarning and implementations() saying why."""
    for logits in (torch.randn(4, 16, device=device, dtype=torch.float64), torch.randn(3, 600, device=device)):
        recorder.reset()
        with pytest.warns(recorder.FallbackWarning, match="router_topk runs the pure-PyTorch reference"):
            w, ids = router_topk(logits, 4, True)
        rw, rids = reference.router_topk(logits, 4, True)
        assert torch.equal(w, rw) and torch.equal(ids, rids)
        assert recorder.implementations()["router_topk"].startswith("reference (")


@pytest.mark.parametrize("device", DEVICES)
def test_single_expert_column_of_any_stride(device):
    # E == 1 has no stride(1) to honour: a transposed row (strides [1, T]) is accepted, as moe_permute and
    # moe_unpermute accept such views; every token takes expert 0 with weight 1 (NaN for a NaN logit)
    col = torch.randn(1, 5, device=device).t()
    col[2, 0] = float("nan")
    assert col.shape == (5, 1) and col.stride() == (1, 5)
    for renormalize in (True, False):
        w, ids = poisoned_out(5, 1, device)
        router_topk(col, 1, renormalize, out=(w, ids))
        rw, rids = reference.router_topk(col, 1, renormalize)
        assert torch.equal(ids, rids) and not (ids != 0).any()
        torch.testing.assert_close(w, rw, atol=0, rtol=0, equal_nan=True)
        assert torch.isnan(w[2]).all() and (w[[0, 1, 3, 4]] == 1).all()
        fw, fids = router_topk(col, 1, renormalize)
        assert torch.equal(fids, ids) and torch.equal(fw.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_int32_overflow_is_an_error(device):
    # zero-stride views claim T rows without allocating them (their rows stay contiguous, so the stride check
    # passes); the check runs before the outputs are allocated. The out variant goes first with empty buffers:
    # were the T*k check missing, its output-shape check would fail instead, at no cost.
    big = torch.zeros(1, 8, device=device).expand(2**28, 8)  # T * k = 2^28 * 8 = 2^31
    assert big.stride() == (0, 1)
    empty = (torch.empty(0, device=device), torch.empty(0, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="T \\* top_k = 2147483648 does not fit int32"):
        router_topk(big, 8, True, out=empty)
    with pytest.raises(ValueError, match="T \\* top_k = 2147483648 does not fit int32"):
        router_topk(big, 8, True)
    # T * k = 2^31 - 1 fits: the T*k check passes and the (empty) out buffers are what is rejected
    edge = torch.zeros(1, 1, device=device).expand(2**31 - 1, 1)
    with pytest.raises(ValueError, match="out weights must be a contiguous"):
        router_topk(edge, 1, True, out=empty)


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
