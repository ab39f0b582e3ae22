"""The expert-parallel cases, run on every rank of a spawned gloo group (``tests/parallel_harness.py``).

``run_all(rank, world, small, small_fused, big)`` runs, in one group: the peak-RSS measurement of loading the
checkpoint ``big`` with this group (first, so the peak is the load's), then (world > 1) every op case and every
model case.
It returns ``{"rss": {...}, "cases": {name: None or failure text}, "exact": {name: {...}}}``; the test modules
turn each case into one test. Every rank builds the same seeded inputs for all ranks, computes the single-process
reference on the concatenated tokens itself, and checks its own slice. Checks that follow a collective never skip
one: a case records its mismatches and raises at its end, so the ranks stay in step.
"""

from __future__ import annotations

import functools
import gc
import re
import traceback

import torch
import torch.distributed as dist
from tolerances import tol, twice_torch_error_bound

from qwen3moe_kernels import ops, parallel
from qwen3moe_kernels.model import Qwen3MoeConfig, Qwen3MoeForCausalLM

H, I = 32, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (E, k): E = 8 and 128 with k = 1, 2, 8
SHAPES = ((8, 1), (8, 2), (8, 8), (128, 1), (128, 2), (128, 8))
# tokens per rank, uneven, one rank with T = 0 in each
TOKENS = {2: ([7, 0], [3, 12], [0, 5]), 4: ([5, 0, 9, 3], [1, 6, 0, 11], [13, 2, 4, 0])}


def _tol(dtype):
    # fp32: the 1e-5; bf16: the table's GEMM tolerance (2 ulp after the fp32 sum)
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else tol("gemm", dtype)


class Mismatches:
    """Collects failed comparisons so that a case runs all its collectives before it fails."""

    def __init__(self):
        self.failed: list[str] = []
        self.exact: dict[str, bool] = {}

    def close(self, name, got, want, dtype):
        self.exact[name] = got.shape == want.shape and torch.equal(got, want)
        try:
            torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
        except AssertionError as e:
            self.failed.append(f"{name}: {e}")

    def within_torch_error(self, name, got, want32, torch_lowp, factor):
        """The low-precision rule: error against fp32 at most ``factor`` x the single-process one (+1e-5)."""
        err = (got.float() - want32).abs().max().item() if got.numel() else 0.0
        bound = twice_torch_error_bound(want32, torch_lowp, factor=factor)
        self.exact[name] = torch.equal(got, torch_lowp)
        if not err <= bound:
            self.failed.append(f"{name}: error {err:.3e} against fp32 exceeds {factor} x single-process's + 1e-5 "
                               f"({bound:.3e})")

    def equal(self, name, got, want):
        self.exact[name] = got.shape == want.shape and torch.equal(got, want)
        if not self.exact[name]:
            err = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
            self.failed.append(f"{name}: not bit-identical (max abs diff {err}; {list(got.shape)} vs "
                               f"{list(want.shape)})")

    def check(self, name, cond, msg):
        if not cond:
            self.failed.append(f"{name}: {msg}")

    def done(self):
        if self.failed:
            raise AssertionError("; ".join(self.failed))
        return self.exact


def _weights(E, dtype, seed, quantized=False):
    g = torch.Generator().manual_seed(seed)
    if quantized:  # multiples of 1/8 in [-1, 1]: every router product and sum exact, in any order
        router = torch.randint(-8, 9, (E, H), generator=g).float() / 8
    else:
        router = torch.randn(E, H, generator=g) * 0.3
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w_down = torch.randn(E, H, I, generator=g) * I**-0.5
    return router.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)


def _tokens(Ts, dtype, seed, quantized=False):
    g = torch.Generator().manual_seed(seed)
    if quantized:  # multiples of 1/4 in [-2, 2]
        return [(torch.randint(-8, 9, (T, H), generator=g).float() / 4).to(dtype) for T in Ts]
    return [torch.randn(T, H, generator=g).to(dtype) for T in Ts]


def _parity(rank, world, dtype, E, k, Ts, seed=0, quantized=False, xs=None, weights=None, exact=(), activation="silu"):
    """fused_moe(ep_group) against single-process fused_moe on all ranks' tokens: forward and gradients."""
    router, w_gate_up, w_down = weights or _weights(E, dtype, seed, quantized)
    xs = xs or _tokens(Ts, dtype, seed + 1, quantized)
    Ts = [x.shape[0] for x in xs]
    x_all = torch.cat(xs)
    ref_leaves = [t.clone().requires_grad_() for t in (x_all, router, w_gate_up, w_down)]
    ref_out, ref_logits = ops.fused_moe(*ref_leaves, k, True, activation)
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(ref_out.shape, generator=g).to(dtype)
    ref_out.backward(dout)

    lo, hi = parallel.expert_range(E, None)
    mine = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
    leaves = [t.clone().requires_grad_() for t in (xs[rank], router, w_gate_up[lo:hi], w_down[lo:hi])]
    out, logits = ops.fused_moe(*leaves, k, True, activation, ep_group=dist.group.WORLD)
    out.backward(dout[mine])
    d_router = leaves[1].grad.float()
    dist.all_reduce(d_router)  # the router is replicated: its gradient is the sum over ranks (as DDP forms it)

    m = Mismatches()
    compare = {"out": (out, ref_out.detach()[mine]), "logits": (logits, ref_logits.detach()[mine]),
               "dx": (leaves[0].grad, ref_leaves[0].grad[mine]),
               "d_w_gate_up": (leaves[2].grad, ref_leaves[2].grad[lo:hi]),
               "d_w_down": (leaves[3].grad, ref_leaves[3].grad[lo:hi]),
               "d_router (all-reduced)": (d_router, ref_leaves[1].grad.float())}
    for name, (got, want) in compare.items():
        if name in exact:
            m.equal(name, got.detach(), want)
        else:
            m.close(name, got.detach(), want, dtype)
    return m.done()


# ------------------------------------------------------------------------------------------- op cases


def case_parity(dtype, E, k, Ts, activation="silu"):
    return lambda rank, world: _parity(rank, world, dtype, E, k, Ts, seed=E * 10 + k, activation=activation)


def case_exact(dtype, E, k, Ts):
    """Router inputs whose products and sums are exact: the logits (a BLAS call whose rows depend on the batch's
    row count) are then the same bits on one process and on many, and so is everything after them but the router
    backward: out, the logits and the expert-shard gradients must be bit-identical."""
    return lambda rank, world: _parity(rank, world, dtype, E, k, Ts, seed=3, quantized=True,
                                       exact=("out", "logits", "d_w_gate_up", "d_w_down"))


def case_one_rank(dtype):
    """Every token of every rank routed to the last rank's experts: the other ranks receive no rows at all."""

    def run(rank, world):
        E, k = 8, 2
        router, w_gate_up, w_down = _weights(E, dtype, 5)
        last = range(E - E // world, E)
        router = router.float().abs() * torch.tensor([1.0 if e in last else -1.0 for e in range(E)])[:, None]
        xs = [x.float().abs().to(dtype) for x in _tokens(TOKENS[world][1], dtype, 6)]
        router = router.to(dtype)
        # the rows each rank receives, through the public dispatch
        logits = torch.nn.functional.linear(xs[rank], router)
        weights, ids = ops.router_topk(logits, k, True)
        x_local, _ = parallel.dispatch(xs[rank], ids, weights, None, E)
        received = x_local.shape[0]
        all_received = [[0]] * world
        dist.all_gather_object(all_received, received)
        m = Mismatches()
        m.check("rows received", all_received[:-1] == [0] * (world - 1) and all_received[-1] == sum(
            x.shape[0] for x in xs) * k, f"{all_received}")
        m.done()
        return _parity(rank, world, dtype, E, k, None, xs=xs, weights=(router, w_gate_up, w_down))

    return run


def case_dispatch_combine(dtype, E, k):
    """The public dispatch/combine around moe_experts: the received rows grouped by local expert, exactly; the
    forward and the gradients of x, the routing weights and the shard against single-process moe_experts."""

    def run(rank, world):
        Ts = TOKENS[world][2]
        _, w_gate_up, w_down = _weights(E, dtype, 7)
        xs = _tokens(Ts, dtype, 8)
        g = torch.Generator().manual_seed(9)
        ids_all = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(sum(Ts))]).int() if sum(Ts) else \
            torch.zeros(0, k, dtype=torch.int32)
        w_all = torch.rand(sum(Ts), k, generator=g)
        x_all = torch.cat(xs)
        lo, hi = parallel.expert_range(E, None)
        mine = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))

        ref = [t.clone().requires_grad_() for t in (x_all, w_gate_up, w_down, w_all)]
        ref_out = ops.moe_experts(ref[0], ref[1], ref[2], ids_all, ref[3])
        dout = torch.randn(ref_out.shape, generator=g).to(dtype)
        ref_out.backward(dout)
        ref32 = [t.detach().float().requires_grad_() for t in (x_all, w_gate_up, w_down, w_all)]
        ops.moe_experts(ref32[0], ref32[1], ref32[2], ids_all, ref32[3]).backward(dout.float())

        x = xs[rank].clone().requires_grad_()
        w = w_all[mine].clone().requires_grad_()
        shard = [w_gate_up[lo:hi].clone().requires_grad_(), w_down[lo:hi].clone().requires_grad_()]
        x_local, handle = parallel.dispatch(x, ids_all[mine], w, None, E)
        local_ids = handle.expert_ids
        y = ops.moe_experts(x_local, shard[0], shard[1], local_ids[:, None],
                            torch.ones(local_ids.shape[0], 1))
        out = parallel.combine(y, handle)
        out.backward(dout[mine])

        # what each local expert must have received: rank 0's slots first, each rank's in slot order
        want_rows, want_ids = [], []
        for e in range(lo, hi):
            for t, j in zip(*torch.where(ids_all == e)):  # row-major: token order, one slot per (t, e)
                want_rows.append(x_all[t])
                want_ids.append(e - lo)
        want_rows = torch.stack(want_rows) if want_rows else x_all.new_zeros(0, H)
        counts = torch.bincount(torch.tensor(want_ids, dtype=torch.long), minlength=hi - lo)
        m = Mismatches()
        m.equal("grouped rows", x_local.detach(), want_rows)
        m.equal("expert_ids", local_ids, torch.tensor(want_ids, dtype=torch.int32))
        m.equal("expert_offsets", handle.expert_offsets.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        m.check("experts without rows", E == 8 or bool((counts == 0).any()), "E=128 should leave experts empty")
        m.close("out", out.detach(), ref_out.detach()[mine], dtype)
        # The composition's backward rounds w * dout to bf16 before the down GEMM's backward (combine's), where
        # the single-process experts weight after it, and takes d_weights from the bf16 expert rows (an H-long
        # dot) rather than from dout @ w_down (I-long): in bf16 its error against fp32 is up to 2.8x the
        # single-process one (measured over 12 seeds x 4 ranks x 2 shapes), so 4x; fp32 as everywhere. The
        # fused EP path has no such rounding (its parity cases hold the single-process tolerances).
        grads = {"dx": (x.grad, ref[0].grad[mine], ref32[0].grad[mine]),
                 "d_weights": (w.grad, ref[3].grad[mine], ref32[3].grad[mine]),
                 "d_w_gate_up": (shard[0].grad, ref[1].grad[lo:hi], ref32[1].grad[lo:hi]),
                 "d_w_down": (shard[1].grad, ref[2].grad[lo:hi], ref32[2].grad[lo:hi])}
        for name, (got, want, want32) in grads.items():
            if dtype == torch.float32:
                m.close(name, got, want, dtype)
            else:
                m.within_torch_error(name, got, want32, want, factor=4.0)
        return m.done()

    return run


def case_module(rank, world):
    """``ExpertParallelMoE.from_full``: this rank's shard, a [B, S, H] input, the single-process block's output."""
    E, k, dtype = 8, 2, torch.float32
    router, w_gate_up, w_down = _weights(E, dtype, 12)
    xs = _tokens([3 * (1 + r % 2) for r in range(world)], dtype, 13)
    block = parallel.ExpertParallelMoE.from_full(router, w_gate_up, w_down, k, True, dist.group.WORLD)
    with torch.no_grad():
        out, logits = block(xs[rank].view(1, -1, H))
        ref = ops.fused_moe(torch.cat(xs), router, w_gate_up, w_down, k, True)[0]
    lo, hi = parallel.expert_range(E, None)
    m = Mismatches()
    m.check("shard", block.w_gate_up.shape[0] == hi - lo and block.expert_range == (lo, hi), str(block))
    m.close("out", out.view(-1, H), ref[sum(x.shape[0] for x in xs[:rank]):][: xs[rank].shape[0]], dtype)
    return m.done()


def case_float64(rank, world):
    """A valid dtype no kernel takes: the reference experts between dispatch and combine, visibly (a
    FallbackWarning), differentiable, against reference.fused_moe on all ranks' tokens."""
    import warnings

    from qwen3moe_kernels import FallbackWarning, reference

    E, k, dtype = 8, 2, torch.float64
    router, w_gate_up, w_down = _weights(E, dtype, 14)
    xs = _tokens(TOKENS[world][1], dtype, 15)
    lo, hi = parallel.expert_range(E, None)
    x = xs[rank].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, _ = ops.fused_moe(x, router, w_gate_up[lo:hi], w_down[lo:hi], k, True, ep_group=dist.group.WORLD)
    out.sum().backward()
    x_all = torch.cat(xs).requires_grad_()
    ref = reference.fused_moe(x_all, router, w_gate_up, w_down, k, True)[0]
    ref.sum().backward()
    mine = slice(sum(x.shape[0] for x in xs[:rank]), sum(x.shape[0] for x in xs[: rank + 1]))
    m = Mismatches()
    m.check("warning", any(issubclass(r.category, FallbackWarning) for r in rec), [str(r.message) for r in rec])
    # float64 end to end, the combine included (it summed in fp32 once: errors ~1e-7)
    for name, got, want in (("out", out.detach(), ref.detach()[mine]), ("dx", x.grad, x_all.grad[mine])):
        err, scale = ((got - want).abs().max().item(), want.abs().max().item()) if got.numel() else (0.0, 1.0)
        m.check(f"{name} within float64 rounding", err <= 1e-12 * max(1.0, scale), err)
    return m.done()


def case_callable_activation(rank, world):
    """A callable activation (single-process fused_moe takes one): the reference experts between dispatch and
    combine, visibly, with the single-process result on this rank's tokens."""
    import warnings

    from qwen3moe_kernels import FallbackWarning

    E, k, dtype = 8, 2, torch.float32
    router, w_gate_up, w_down = _weights(E, dtype, 16)
    xs = _tokens(TOKENS[world][1], dtype, 17)
    lo, hi = parallel.expert_range(E, None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, _ = ops.fused_moe(xs[rank], router, w_gate_up[lo:hi], w_down[lo:hi], k, True, torch.tanh,
                               ep_group=dist.group.WORLD)
        want, _ = ops.fused_moe(xs[rank], router, w_gate_up, w_down, k, True, torch.tanh)
    m = Mismatches()
    m.check("warning", any("callable" in str(r.message) for r in rec if issubclass(r.category, FallbackWarning)),
            [str(r.message) for r in rec])
    m.close("out", out, want, dtype)
    return m.done()


def case_any_exception_in_a_checked_block(rank, world):
    """raise_together: any exception on one rank (an AttributeError from a non-tensor argument, say) stops every
    rank, the others with a RuntimeError naming that rank, instead of leaving them in the next collective."""
    last = world - 1

    def check():
        if rank == last:
            [].shape  # noqa: B018: what a check does with a list where it expects a tensor

    if rank == last:
        _expect(AttributeError, "shape", lambda: parallel.raise_together(check, None, "test"))
    else:
        _expect(RuntimeError, rf"test: rank {last} of the {world} ranks of ep_group rejected its arguments",
                lambda: parallel.raise_together(check, None, "test"))
    return {}


def _expect(exc, pattern, fn):
    try:
        fn()
    except exc as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"{type(e).__name__} raised, but its message {str(e)!r} does not match "
                                 f"{pattern!r}") from e
        return str(e)
    except Exception as e:  # noqa: BLE001 - the wrong exception is the failure being reported
        raise AssertionError(f"expected {exc.__name__} matching {pattern!r}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__} matching {pattern!r}; nothing was raised")


def _bad_call(rank, world, E=8, k=2, H_=H, dtype=torch.float32, shard=None, x_shape=None, router_dtype=None,
              grad=False, activation="silu", x_list=False):
    router, w_gate_up, w_down = _weights(E, dtype, 11)
    router = router[:, :H_].contiguous().to(router_dtype or dtype)
    n = E // world if shard is None else shard
    lo = rank * n
    wgu = w_gate_up[lo : lo + n, :, :H_].contiguous()
    wd = w_down[lo : lo + n, :H_].contiguous()
    x = torch.randn(x_shape or (3 + rank, H_)).to(dtype).requires_grad_(grad)
    x = x.tolist() if x_list else x
    return lambda: ops.fused_moe(x, router, wgu, wd, k, True, activation, ep_group=dist.group.WORLD)


def bad_cases(world):
    """name -> (exception, message pattern, the call): each must raise on every rank, never hang."""
    last = world - 1
    cases = {
        "bad: E % world != 0": (ValueError, rf"E={6 if world == 4 else 7} experts cannot be shared evenly by "
                                            rf"the {world} ranks",
                                lambda r: _bad_call(r, world, E=6 if world == 4 else 7, shard=1)),
        "bad: shard for another group": (
            ValueError, rf"w_gate_up must be this rank's shard \[E/world = 8/{world} = {8 // world}, 2I, H=32\], "
                        rf"got \[{16 // world}, 32, 32\].*sharded for another group",
            lambda r: _bad_call(r, world, shard=16 // world)),
        "bad: H differs across ranks": (ValueError, r"disagree on H \(x.shape\[1\]\) \(rank 0: 32, .*16",
                                        lambda r: _bad_call(r, world, H_=16 if r == last else H)),
        "bad: dtype differs across ranks": (
            TypeError, r"disagree on x's dtype",
            lambda r: _bad_call(r, world, dtype=torch.bfloat16 if r else torch.float32)),
        "bad: top_k differs across ranks": (ValueError, r"disagree on top_k \(rank 0: 2, rank 1: 3",
                                            lambda r: _bad_call(r, world, k=3 if r == 1 else 2)),
        "bad: x not 2-D on one rank": (ValueError, rf"rank {last}: x must be \[T, H\], got a 3-D tensor",
                                       lambda r: _bad_call(r, world, x_shape=(1, 3, H) if r == last else None)),
        "bad: router dtype on one rank": (TypeError, r"rank 1: router_weight must have x's dtype torch.float32",
                                          lambda r: _bad_call(r, world, router_dtype=torch.bfloat16 if r == 1
                                                              else None)),
        "bad: gradient flags differ": (ValueError, r"disagree on whether x needs a gradient",
                                       lambda r: _bad_call(r, world, grad=r == 0)),
        "bad: activation differs across ranks": (
            ValueError, r"disagree on activation \(rank 0: 'silu', rank 1: 'gelu'",
            lambda r: _bad_call(r, world, activation="gelu" if r == 1 else "silu")),
        "bad: unknown activation on one rank": (
            ValueError, rf"rank {last}: activation must be one of \('silu', 'gelu', 'gelu_tanh', 'relu'\)",
            lambda r: _bad_call(r, world, activation="swiglu" if r == last else "silu")),
        "bad: x not a tensor on one rank": (TypeError, rf"rank {last}: x must be a torch.Tensor",
                                            lambda r: _bad_call(r, world, x_list=r == last)),
        "bad: top_k not an int on one rank": (TypeError, rf"rank {last}: top_k must be an int",
                                              lambda r: _bad_call(r, world, k=None if r == last else 2)),
        "bad: dispatch k = 0 on one rank": (
            ValueError, rf"rank {last}: ids must be \[T=2, k\] with k >= 1, got \[2, 0\]",
            lambda r: lambda: parallel.dispatch(
                torch.randn(2, H), torch.zeros(2, 0 if r == last else 2, dtype=torch.int64),
                torch.rand(2, 0 if r == last else 2), None, 8)),
        "bad: dispatch ids out of range": (
            ValueError, rf"dispatch \(ep_group of {world} ranks\): rank {last}: ids must be expert ids in "
                        r"\[0, num_experts=8\), got values in \[0, 8\]",
            lambda r: lambda: parallel.dispatch(torch.randn(2, H), torch.tensor([[0, 1], [8 if r == last else 2, 3]]),
                                                torch.rand(2, 2), None, 8)),
    }
    return cases


def case_bad(world, name):
    exc, pattern, make = bad_cases(world)[name]
    return lambda rank, w: _expect(exc, pattern, make(rank)) and {}


def op_cases(world) -> dict:
    cases = {}
    for d, dtype in DTYPES.items():
        for i, (E, k) in enumerate(SHAPES):
            cases[f"parity {d} E={E} k={k}"] = case_parity(dtype, E, k, TOKENS[world][i % 3])
        for E, k in ((8, 2), (128, 8)):
            cases[f"bit-identical {d} E={E} k={k}"] = case_exact(dtype, E, k, TOKENS[world][0])
            cases[f"dispatch/combine {d} E={E} k={k}"] = case_dispatch_combine(dtype, E, k)
        cases[f"all tokens to one rank {d}"] = case_one_rank(dtype)
    cases["parity fp32 E=8 k=2 gelu"] = case_parity(torch.float32, 8, 2, TOKENS[world][0], "gelu")
    cases["module form (ExpertParallelMoE)"] = case_module
    cases["float64: the reference experts, visibly"] = case_float64
    cases["callable activation: the reference experts, visibly"] = case_callable_activation
    cases["any exception in a checked block stops every rank"] = case_any_exception_in_a_checked_block
    for name in bad_cases(world):
        cases[name] = case_bad(world, name)
    # after the errors: the group still exchanges in step
    cases["group usable after the errors"] = case_parity(torch.float32, 8, 2, TOKENS[world][1])
    return cases


# ----------------------------------------------------------------------------------------- model cases


def _model_cases(small):
    @functools.cache
    def load(which):
        """Loaded once per process (no case changes a model): "ref" the single-process model, "ep" / "ep_fused"
        this rank's expert-parallel model from the per-expert / the fused checkpoint."""
        if which == "ref":
            return Qwen3MoeForCausalLM.from_pretrained(small["per_expert"], backend="fused")
        path = small["per_expert"] if which == "ep" else small["fused"]
        return Qwen3MoeForCausalLM.from_pretrained(path, ep_group=dist.group.WORLD)

    def batch(rank, vocab, seed=0):
        g = torch.Generator().manual_seed(100 * seed + rank)
        return torch.randint(0, vocab, (1 + rank % 2, 5 + 2 * rank), generator=g)

    def shards(rank, world):
        ref, ep, ep_fused = load("ref"), load("ep"), load("ep_fused")
        m = Mismatches()
        lo, hi = parallel.expert_range(ref.config.num_experts, None)
        full = dict(ref.named_parameters())
        for model_name, model in (("per-expert file", ep), ("fused file", ep_fused)):
            for name, p in model.named_parameters():
                want = full[name][lo:hi] if name.endswith(("w_gate_up", "w_down")) else full[name]
                m.equal(f"{model_name}: {name}", p.detach(), want.detach())
        m.done()
        return {}

    def forward(rank, world):
        ref, ep = load("ref"), load("ep")
        ids = batch(rank, ref.config.vocab_size)
        with torch.no_grad():
            got, want = ep(ids, output_router_logits=True), ref(ids, output_router_logits=True)
        m = Mismatches()
        m.close("logits", got.logits, want.logits, torch.float32)
        for i, (a, b) in enumerate(zip(got.router_logits, want.router_logits)):
            m.close(f"router logits {i}", a, b, torch.float32)
        return m.done()

    def generate(rank, world):
        ref, ep = load("ref"), load("ep")
        ids = batch(rank, ref.config.vocab_size, seed=1)
        m = Mismatches()
        m.equal("greedy tokens", ep.generate(ids, max_new_tokens=5), ref.generate(ids, max_new_tokens=5))
        # an eos that some rows reach: the ranks stop together, only when every rank's rows are done
        eos = int(ref.generate(ids, max_new_tokens=2)[0, -1])
        got = ep.generate(ids, max_new_tokens=6, eos_token_id=eos)
        want = ref.generate(ids, max_new_tokens=6, eos_token_id=eos)
        # this rank may finish before the others: it then goes on with pad (= eos) tokens until all have
        m.equal("greedy tokens with eos", got[:, : want.shape[1]], want)
        m.check("padding after eos", bool((got[:, want.shape[1]:] == eos).all()), f"{got} vs {want}")
        return m.done()

    def bad_batch(rank, world):
        ep = load("ep")
        ids = batch(rank, ep.config.vocab_size)
        if rank == world - 1:
            ids[0, 0] = ep.config.vocab_size
        pattern = r"input_ids must be in \[0, vocab_size" if rank == world - 1 else \
            rf"rank {world - 1} of the {world} ranks of ep_group rejected its arguments"
        _expect(ValueError, pattern, lambda: ep(ids))
        _expect(ValueError, r"disagree on max_new_tokens", lambda: ep.generate(batch(rank, 96), 2 + rank))
        return {}

    def reads(rank, world):
        """Which tensors the loader reads (get_tensor, or a slice's bytes): only this rank's experts."""
        from qwen3moe_kernels.model import loading

        real, read = loading.safe_open, []

        class Slice:
            def __init__(self, s, name):
                self.s, self.name = s, name

            def get_shape(self):
                return self.s.get_shape()

            def __getitem__(self, index):
                read.append((self.name, index))
                return self.s[index]

        class File:
            def __init__(self, *a, **kw):
                self.f = real(*a, **kw)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                read.append((name, None))
                return self.f.get_tensor(name)

            def get_slice(self, name):
                return Slice(self.f.get_slice(name), name)

        loading.safe_open = File
        try:
            Qwen3MoeForCausalLM.from_pretrained(small["per_expert"], ep_group=dist.group.WORLD)
            per_expert = list(read)
            read.clear()
            Qwen3MoeForCausalLM.from_pretrained(small["fused"], ep_group=dist.group.WORLD)
            fused = list(read)
        finally:
            loading.safe_open = real
        lo, hi = parallel.expert_range(8, None)
        m = Mismatches()
        experts = [int(re.search(r"experts\.(\d+)\.", n).group(1)) for n, _ in per_expert if ".experts." in n]
        m.check("per-expert file", experts and all(lo <= j < hi for j in experts)
                and len(experts) == 3 * (hi - lo) * 2, f"experts read: {sorted(set(experts))}, mine [{lo}, {hi})")
        stacked = [(n, i) for n, i in fused if n.endswith(("gate_up_proj", "down_proj"))]
        m.check("fused file", len(stacked) == 4 and all(i == slice(lo, hi) for _, i in stacked),
                f"stacked experts read as {stacked}, expected the slice [{lo}:{hi}] of each")
        return m.done()

    def uneven_experts(rank, world):
        cfg = Qwen3MoeConfig.from_pretrained(small["per_expert"])
        cfg.num_experts = 8 + 1
        with torch.device("meta"):
            _expect(ValueError, rf"9 experts cannot be shared evenly by the {world} ranks",
                    lambda: Qwen3MoeForCausalLM(cfg, ep_group=dist.group.WORLD))
        return {}

    return {"model: shards loaded (per-expert and fused files)": shards,
            "model: only this rank's experts are read": reads, "model: forward": forward,
            "model: generate": generate, "model: a bad batch on one rank": bad_batch,
            "model: E % world != 0": uneven_experts}


MODEL_CASES = tuple(_model_cases({"per_expert": "", "fused": ""}))


# ----------------------------------------------------------------------------------------------- GPU


def count_dispatch_syncs(rank: int, world: int) -> int:
    """Host syncs of one dispatch on CUDA with NCCL, by torch's sync debug mode (a warning per sync)."""
    import warnings

    x = torch.randn(64, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (64, 2), device="cuda", dtype=torch.int32)
    w = torch.rand(64, 2, device="cuda")
    parallel.dispatch(x, ids, w, None, 8)  # warm-up: lazy initialisation is not the dispatch's
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            parallel.dispatch(x, ids, w, None, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(r.message) for r in rec)


# --------------------------------------------------------------------------------------------- RSS


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_load_rss(big: str, small: str) -> dict:
    """Peak RSS growth (KiB) while loading ``big`` with this group, and the bytes of the local parameters.

    A load of ``small`` first pays the one-time costs (lazy imports, the first meta-device module: ~150 MB);
    then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` 5) and read back after the load
    (``VmHWM``): the growth is the load's own, parameters plus the checkpoint pages it touched."""
    Qwen3MoeForCausalLM.from_pretrained(small, ep_group=dist.group.WORLD)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = Qwen3MoeForCausalLM.from_pretrained(big, ep_group=dist.group.WORLD)
    peak = _status_kib("VmHWM")
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(("w_gate_up",
                                                                                                    "w_down")))
    others = sum(p.numel() * p.element_size() for n, p in model.named_parameters()) - experts
    del model
    gc.collect()
    return {"rss_before_kib": before, "peak_rss_kib": peak, "load_peak_growth_kib": peak - before,
            "local_expert_bytes": experts, "other_param_bytes": others}


# ----------------------------------------------------------------------------------------------- entry


def run_all(rank: int, world: int, small: str, small_fused: str, big: str) -> dict:
    out = {"rss": measure_load_rss(big, small), "cases": {}, "exact": {}}
    if world == 1:
        return out
    cases = dict(op_cases(world))
    cases.update(_model_cases({"per_expert": small, "fused": small_fused}))
    for name, fn in cases.items():
        try:
            exact = fn(rank, world)
            out["cases"][name] = None
            if exact:
                out["exact"][name] = exact
        except AssertionError as e:
            out["cases"][name] = f"rank {rank}: {e}"
        except Exception:  # noqa: BLE001 - an unexpected error may leave the ranks out of step: stop here
            out["cases"][name] = f"rank {rank}: {traceback.format_exc()}"
            for rest in cases:
                out["cases"].setdefault(rest, "not run: an earlier case raised unexpectedly")
            break
    return out
