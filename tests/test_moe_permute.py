"""Tests of qwen3moe.moe_sort / moe_align_block / moe_permute / moe_unpermute (ops/moe_permute.py,
csrc/moe_permute*) against the reference functions of the same names.

Index ops and permute are compared exactly; unpermute with the "elementwise" tolerance (an fp32 sum of k
products, then one rounding), and exactly where the weights are one-hot (unpermute(permute(x)) == x).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import DEVICES, poison
from tolerances import tol

import qwen3moe_kernels as qk
from qwen3moe_kernels import reference
from qwen3moe_kernels.ops.moe_permute import moe_align_block, moe_permute, moe_sort, moe_unpermute, padded_bound

GRID_T = [0, 1, 7, 83, 4096, 65536]
GRID_E = [8, 60, 128, 256]
GRID_K = [1, 2, 8]
GRID = [(T, E, k) for T in GRID_T for E in GRID_E for k in GRID_K]
ID_MODES = ["random", "hot_expert", "one_expert"]


def random_ids(T, E, k, device, dtype=torch.int32):
    """Router-like ids: k distinct experts per token (random scores' top-k)."""
    if T == 0:
        return torch.empty(0, k, dtype=dtype, device=device)
    return torch.rand(T, E).topk(k, dim=-1).indices.to(device, dtype)


def grid_ids(T, E, k, mode, device):
    """random: router-like ids. hot_expert: router-like, and every token's first choice is expert E // 3 (it gets
    all T tokens). one_expert: every slot on expert E // 3 (k equal ids per token: not router-like, but legal, and
    the largest group there can be, T*k slots, with every other expert empty)."""
    hot = E // 3
    if mode == "one_expert":
        return torch.full((T, k), hot, dtype=torch.int32, device=device)
    if mode == "hot_expert" and T:
        scores = torch.rand(T, E)
        scores[:, hot] = 2.0  # above every other score
        return scores.topk(k, dim=-1).indices.to(device, torch.int32)
    return random_ids(T, E, k, device)


def assert_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ID_MODES)
@pytest.mark.parametrize("T,E,k", GRID)
def test_sort_and_align_match_reference(device, T, E, k, mode):
    ids = grid_ids(T, E, k, mode, device)
    got_sort = moe_sort(ids, E)
    for got, ref in zip(got_sort, reference.moe_sort(ids, E)):
        assert_equal(got, ref)
    for block in (16, 64):  # the reference's align loops over the E experts in Python: fast enough at T = 65536
        for got, ref in zip(moe_align_block(ids, E, block), reference.moe_align_block(ids, E, block)):
            assert_equal(got, ref)
    counts = got_sort[2].diff().cpu()
    if mode == "hot_expert":
        assert int(counts[E // 3]) == T
    if mode == "one_expert":
        assert int(counts[E // 3]) == T * k and int(counts.sum()) == T * k
        assert_equal(got_sort[0], torch.arange(T * k, dtype=torch.int32))  # stable: the slots in order
    assert qk.implementations()["moe_sort"] == ("cpu" if device == "cpu" else "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [1, 3, 128])
def test_align_all_tokens_one_expert_and_int64(device, block):
    E, k = 60, 1
    ids = torch.full((83, k), 59, dtype=torch.int64, device=device)  # every token on the last expert
    got = moe_align_block(ids, E, block)
    ref = reference.moe_align_block(ids, E, block)
    for g, r in zip(got, ref):
        assert_equal(g, r)
    assert got[0].numel() == padded_bound(83, E, block)
    assert int(got[2]) == -(-83 // block) * block
    sorted_slots, inv, offsets = moe_sort(ids, E)
    assert_equal(offsets, torch.tensor([0] * 60 + [83], dtype=torch.int32))
    assert_equal(sorted_slots, torch.arange(83, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_sort_is_stable_with_repeated_experts(device):
    # many equal ids per row (not router-like): stability, not distinctness, decides the order
    ids = torch.randint(0, 3, (4096, 8), dtype=torch.int32, device=device)
    for got, ref in zip(moe_sort(ids, 8), reference.moe_sort(ids, 8)):
        assert_equal(got, ref)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_permute_unpermute(device, dtype, T, H, E, k, mode="random"):
    ids = grid_ids(T, E, k, mode, device)
    sorted_slots, inv, _ = moe_sort(ids, E)
    x = torch.randn(T, H).to(device, dtype)
    xp = moe_permute(x, sorted_slots, k)
    assert_equal(xp, reference.moe_permute(x, sorted_slots, k))
    y = torch.randn(T * k, H).to(device, dtype)
    weights = torch.rand(T, k, device=device)
    out = moe_unpermute(y, weights, inv)
    torch.testing.assert_close(out, reference.moe_unpermute(y, weights, inv), **tol("elementwise", dtype))
    # out variant into a poisoned buffer
    buf = poison(torch.empty(T, H, dtype=dtype, device=device))
    assert moe_unpermute(y, weights, inv, out=buf) is buf
    assert torch.equal(buf, out)
    # one-hot weights: the round trip is exact
    onehot = torch.zeros(T, k, device=device)
    if T:
        onehot[torch.arange(T), torch.randint(0, k, (T,))] = 1.0
    assert_equal(moe_unpermute(xp, onehot, inv), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,E,k", [(0, 64, 8, 2), (1, 2048, 128, 8), (7, 769, 60, 2), (83, 7, 8, 1),
                                     (256, 2048, 128, 8), (64, 4096, 128, 8)])
def test_permute_unpermute(device, dtype, T, H, E, k):
    # row sizes of the kernels' paths: H = 2048 bf16 is one 256-thread pass of 16-byte vectors on CUDA, 4096 two,
    # 769 and 7 the scalar path
    check_permute_unpermute(device, dtype, T, H, E, k)


# the grid's row size per T: the big T get small rows (at T = 65536, k = 8 the reference gathers T*k*H values in
# fp32, 8 M at H = 16, in well under a second; H = 2048 would be 1 G); the large H run in test_permute_unpermute
GRID_H = {0: 64, 1: 2048, 7: 769, 83: 96, 4096: 32, 65536: 16}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["random", "one_expert"])
@pytest.mark.parametrize("T,E,k", GRID)
def test_permute_unpermute_grid(device, T, E, k, mode):
    dtype = DTYPES[(T + E + k) % 3]  # every dtype meets every size class without a full product
    check_permute_unpermute(device, dtype, T, GRID_H[T], E, k, mode)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_padded_slots_and_strided_x(device):
    T, H, E, k, block = 83, 96, 60, 2, 16
    ids = random_ids(T, E, k, device)
    padded, block_expert, num_padded = moe_align_block(ids, E, block)
    wide = torch.randn(T, H + 5, device=device)
    x = wide[:, 1 : 1 + H]  # row stride H + 5, unaligned: the narrow-copy CUDA path
    xp = moe_permute(x, padded, k)
    pad = padded == T * k
    assert (xp[pad] == 0).all()
    assert_equal(xp[~pad], x[(padded[~pad] // k).long()])
    # every non-padding row sits in a block of its own expert
    blk = torch.arange(padded.numel(), device=device) // block
    assert_equal(block_expert[blk[~pad]].long(), ids.reshape(-1)[padded[~pad].long()].long())
    assert (block_expert[int(num_padded) // block:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    ids = torch.tensor([[0, 3], [2, 8]], dtype=torch.int32, device=device)
    if device == "cpu":  # on CUDA an out-of-range id is a device-side assertion (no host sync to check it)
        with pytest.raises(ValueError, match="expert id 8 .* out of range"):
            moe_sort(ids, 8)
        with pytest.raises(ValueError, match="expert id -1 .* out of range"):
            moe_align_block(torch.tensor([[0, -1]], dtype=torch.int32), 8, 16)
        with pytest.raises(ValueError, match="sorted_slots\\[0\\] = 9 is out of range"):
            moe_permute(torch.randn(2, 4), torch.tensor([9, 0], dtype=torch.int32), 2)
        with pytest.raises(ValueError, match="inv\\[1\\] = 4 is out of range"):
            moe_unpermute(torch.randn(4, 4), torch.rand(2, 2), torch.tensor([0, 4, 1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        moe_sort(ids.float(), 8)
    with pytest.raises(ValueError, match="num_experts must be in"):
        moe_sort(ids, 513)
    with pytest.raises(ValueError, match="block_size must be in"):
        moe_align_block(ids, 16, 0)
    with pytest.raises(ValueError, match="ids must be contiguous"):
        moe_sort(torch.zeros(4, 4, dtype=torch.int32, device=device).t(), 8)
    slots = torch.arange(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="x must be 2-D"):
        moe_permute(torch.randn(8, device=device), slots, 2)
    with pytest.raises(TypeError, match="sorted_slots must be int32"):
        moe_permute(torch.randn(2, 4, device=device), slots.long(), 2)
    with pytest.raises(ValueError, match="stride"):
        moe_permute(torch.randn(4, 2, device=device).t(), slots, 2)
    with pytest.raises(ValueError, match="inv must have T\\*k"):
        moe_unpermute(torch.randn(4, 4, device=device), torch.rand(2, 2, device=device), slots[:3])
    with pytest.raises(TypeError, match="y must be float32"):
        moe_unpermute(torch.randn(4, 4, device=device).double(), torch.rand(2, 2, device=device), slots)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 300), E=st.integers(1, 300), k=st.integers(1, 8), block=st.integers(1, 70),
       H=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_properties_random_shapes(T, E, k, block, H, seed):
    # any ids (repeats allowed), any sizes: sort/align equal the reference; the round trip with one-hot weights
    # is exact; the align invariants hold (each expert's group padded to a multiple of block, in expert order)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    for got, ref in zip(moe_sort(ids, E), reference.moe_sort(ids, E)):
        assert_equal(got, ref)
    padded, block_expert, num_padded = moe_align_block(ids, E, block)
    for got, ref in zip((padded, block_expert, num_padded), reference.moe_align_block(ids, E, block)):
        assert_equal(got, ref)
    n = int(num_padded)
    assert n % block == 0 and n <= padded.numel()
    be = block_expert[: n // block]
    assert (be[1:] >= be[:-1]).all() and (block_expert[n // block:] == -1).all()
    sorted_slots, inv, _ = moe_sort(ids, E)
    x = torch.randn(T, H, generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, k, (T,), generator=g), k).float()
    assert_equal(moe_unpermute(moe_permute(x, sorted_slots, k), onehot, inv), x)


def test_zero_stride_ids_are_rejected_as_not_contiguous():
    # a zero-stride view could claim 2^31 slots for free, but the ids must be contiguous: that check comes first
    ids = torch.zeros(1, dtype=torch.int32).expand(2**30, 2)
    with pytest.raises(ValueError, match="ids must be contiguous"):
        moe_sort(ids, 8)


def test_int32_overflow_is_an_error():
    # moe_permute: a zero-stride x claims T = 2^29 tokens without allocating them; k = 8: T*k = 2^32
    big = torch.zeros(1, 1).expand(2**29, 1)
    with pytest.raises(ValueError, match="T \\* top_k = 4294967296 does not fit int32"):
        moe_permute(big, torch.zeros(1, dtype=torch.int32), 8)
    # moe_sort / moe_align_block need contiguous ids (see above), so T*k = 2^31 slots are a real 8 GiB int32
    # buffer: there is no way to reach their T*k check without one. torch.empty only reserves the address space
    # (no page is committed until written), and the check fails before any element is read, so the only page
    # touched is the one written here. That id is out of range: were the T*k check missing, the sort would
    # report it (a different message) rather than run over 2^31 slots.
    try:
        ids = torch.empty(2**30, 2, dtype=torch.int32)
    except RuntimeError:  # a machine that cannot even reserve 8 GiB of address space
        pytest.skip("cannot reserve 8 GiB of address space for 2^31 int32 ids")
    ids[0, 0] = 8
    with pytest.raises(ValueError, match="ids.numel\\(\\) = T\\*k = 2147483648 does not fit int32"):
        moe_sort(ids, 8)
    with pytest.raises(ValueError, match="ids.numel\\(\\) = T\\*k = 2147483648 does not fit int32"):
        moe_align_block(ids, 8, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for T, E, k in [(0, 8, 2), (7, 60, 2), (83, 128, 8)]:
        ids = random_ids(T, E, k, device)
        sorted_slots, inv, _ = moe_sort(ids, E)
        x = torch.randn(T, 33, device=device, dtype=torch.bfloat16)
        y = torch.randn(T * k, 33, device=device)
        w = torch.rand(T, k, device=device)
        torch.library.opcheck(torch.ops.qwen3moe.moe_sort.default, (ids, E))
        torch.library.opcheck(torch.ops.qwen3moe.moe_align_block.default, (ids, E, 16))
        torch.library.opcheck(torch.ops.qwen3moe.moe_permute.default, (x, sorted_slots, k))
        torch.library.opcheck(torch.ops.qwen3moe.moe_unpermute.default, (y, w, inv))
        torch.library.opcheck(torch.ops.qwen3moe.moe_unpermute.out, (y, w, inv), {"out": torch.empty(T, 33,
                                                                                                      device=device)})


def test_torch_compile_fullgraph_router_permute_unpermute():
    from qwen3moe_kernels.ops.router_topk import router_topk

    E, k = 60, 4

    def block(x, logits):
        w, ids = router_topk(logits, k, True)
        sorted_slots, inv, _ = moe_sort(ids, E)
        y = moe_permute(x, sorted_slots, k) * 2.0
        return moe_unpermute(y, w, inv)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for T in (7, 83):
        x, logits = torch.randn(T, 32), torch.randn(T, E)
        torch.testing.assert_close(compiled(x, logits), block(x, logits))
        rw, rids = reference.router_topk(logits, k, True)
        s, inv, _ = reference.moe_sort(rids, E)
        ref = reference.moe_unpermute(reference.moe_permute(x, s, k) * 2.0, rw, inv)
        torch.testing.assert_close(compiled(x, logits), ref, **tol("elementwise", torch.float32))


def _cuda_decode_path_no_sync_and_graph_capture(device):
    from qwen3moe_kernels.ops.router_topk import router_topk

    T, E, k, H = 8, 128, 8, 2048
    logits = torch.randn(T, E, device=device)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    w, ids = torch.empty(T, k, device=device), torch.empty(T, k, dtype=torch.int32, device=device)
    out = torch.empty(T, H, device=device, dtype=torch.bfloat16)

    def step():
        router_topk(logits, k, True, out=(w, ids))
        padded, block_expert, num_padded = moe_align_block(ids, E, 16)
        sorted_slots, inv, _ = moe_sort(ids, E)
        moe_unpermute(moe_permute(x, sorted_slots, k), w, inv, out=out)
        return padded

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host<->device sync inside raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    logits.copy_(torch.randn(T, E, device=device))
    g.replay()
    torch.cuda.synchronize()
    rw, rids = reference.router_topk(logits, k, True)
    assert torch.equal(ids, rids)
    s, inv, _ = reference.moe_sort(rids, E)
    ref = reference.moe_unpermute(reference.moe_permute(x, s, k), rw, inv)
    torch.testing.assert_close(out, ref, **tol("elementwise", torch.bfloat16))


if "cuda" in DEVICES:  # defined only where a GPU is, so CPU runs report no skipped test

    def test_cuda_decode_path_no_sync_and_graph_capture():
        _cuda_decode_path_no_sync_and_graph_capture("cuda")
