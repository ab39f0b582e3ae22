"""Expert parallelism (``qwen3moe_kernels.parallel``, ``ops.fused_moe(..., ep_group=)``) on CPU with gloo.

The cases (``parallel_cases.py``) run in one spawned group per world size (2 and 4; ``parallel_harness.py``: a
file store, a 30 s collective timeout, each rank's exception in the failure message) and each is reported here as
one test: forward and gradient parity with single-process ``fused_moe`` (fp32 and bf16; E = 8 and 128; k = 1, 2,
8; uneven T per rank with a rank at T = 0; experts without rows), bit-identical results where the arithmetic allows,
every token routed to one rank, the public dispatch/combine, and bad arguments raising on every rank. World 4 is
marked slow (four processes importing torch on two cores).
"""

from __future__ import annotations

import pytest
import torch

import parallel_cases as pc
from parallel_fixtures import WORLDS, case_failures
from parallel_harness import GroupFailed, run_group
from qwen3moe_kernels import ops
from qwen3moe_kernels.parallel import checks

OP_CASES = [pytest.param(w, name, id=f"world{w}-{name}", marks=[pytest.mark.slow] if w > 2 else [])
            for w in WORLDS for name in pc.op_cases(w)]


@pytest.mark.parametrize("world,name", OP_CASES)
def test_ep_case(world, name):
    failures = case_failures(world, name)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------- in-process


def test_fields_round_trip():
    x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    t = {"x": x, "router_weight": torch.randn(8, 5), "w_gate_up": torch.randn(2, 6, 5, 7),
         "w_down": torch.zeros(0, 4, dtype=torch.int32)}
    values = checks.FUSED_MOE.encode(t, {"top_k": 2, "renormalize": True,
                                         "activation": checks.activation_code("relu")})
    f = checks.FUSED_MOE.decode(values + [-1, 9])
    assert len(values) + 2 == checks.FUSED_MOE.size()
    assert f["x"] == checks.TensorInfo(2, (3, 5), torch.bfloat16, (0, -1), True)
    assert f["w_gate_up"].dim == 4 and str(f["w_gate_up"]) == "a 4-D tensor"
    assert f["w_down"].dtype == torch.int32 and str(f["w_down"]) == "[0, 4]"
    assert (f["top_k"], f["renormalize"], f["ids_min"], f["ids_max"]) == (2, 1, -1, 9)
    assert f["activation"] == 3  # reference.ACTIVATIONS: silu, gelu, gelu_tanh, relu
    # what is not a tensor or an int encodes (never raises: the other ranks would wait in the exchange)
    bad = checks.FUSED_MOE.decode(checks.FUSED_MOE.encode(dict(t, x=[[1.0]]), {
        "top_k": None, "renormalize": True, "activation": checks.activation_code("swiglu")}) + [0, 0])
    assert bad["x"].dim == -1 and bad["top_k"] == bad["activation"] == checks.NOT_AN_INT
    assert isinstance(checks.fused_moe_problem(bad, 2), TypeError)


def test_problems_name_the_sizes():
    def fields(E=8, shard=4, H=16, I=8, k=2, dtype=torch.float32):
        t = {"x": torch.zeros(3, H, dtype=dtype), "router_weight": torch.zeros(E, H),
             "w_gate_up": torch.zeros(shard, 2 * I, H), "w_down": torch.zeros(shard, H, I)}
        return checks.FUSED_MOE.decode(checks.FUSED_MOE.encode(t, {"top_k": k, "renormalize": 1, "activation": 0})
                                       + [0, 0])

    assert checks.fused_moe_problem(fields(), 2) is None
    err = checks.fused_moe_problem(fields(E=6, shard=1), 4)
    assert isinstance(err, ValueError) and "E=6 experts cannot be shared evenly by the 4 ranks" in str(err)
    err = checks.fused_moe_problem(fields(shard=2), 2)
    assert "[E/world = 8/2 = 4, 2I, H=16], got [2, 16, 16]" in str(err) and "a group of 4 ranks" in str(err)
    assert isinstance(checks.fused_moe_problem(fields(dtype=torch.bfloat16), 2), TypeError)
    with pytest.raises(ValueError, match=r"rank 1: top_k must be in \[1, E=8\], got 9"):
        checks.check_fused_moe([fields(), fields(k=9)])
    with pytest.raises(ValueError, match=r"disagree on 2I \(w_gate_up.shape\[1\]\) \(rank 0: 16, rank 1: 8\)"):
        checks.check_fused_moe([fields(), fields(I=4)])


def test_ep_group_needs_torch_distributed():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        ops.fused_moe(x, torch.randn(4, 8), torch.randn(2, 6, 8), torch.randn(2, 8, 3), 2, True, ep_group=object())


@pytest.mark.slow
def test_a_failed_rank_fails_the_test_rather_than_wedge_it():
    """A rank that raises: its traceback is in the failure (the rank waiting for it in a collective fails as gloo
    sees the peer go). A rank that hangs: the group is killed at the deadline, and the failure says so."""
    with pytest.raises(GroupFailed) as e:
        run_group(2, "parallel_harness:raise_or_wait", False, deadline_s=60)
    assert "rank 1 raised" in str(e.value) and "ValueError: rank 1 fails on purpose" in str(e.value), str(e.value)
    with pytest.raises(GroupFailed) as e:
        run_group(2, "parallel_harness:raise_or_wait", True, deadline_s=3)
    assert "rank 1: no result (still running at the deadline (killed))" in str(e.value), str(e.value)


@pytest.mark.gpu
def test_one_host_sync_per_dispatch_cuda():
    """UNTESTED HERE (no GPU): one NCCL rank, torch's sync debug mode counts the dispatch's host syncs."""
    assert run_group(1, "parallel_cases:count_dispatch_syncs", backend="nccl") == [1]


@pytest.mark.slow
def test_ep_benchmark_runs_at_tiny_size():
    """``qwen3moe-kernels bench --ops ep``'s run(): two gloo processes, every row checked and timed."""
    from qwen3moe_kernels.bench import ep

    shapes = dict(hidden=64, moe_intermediate=32, experts=8, top_k=2)
    rows = ep.run("cpu", [1, 5], torch.float32, shapes=shapes, budget_s=0.01, min_runs=2, log=None)
    assert [(r["op"], r["tokens"]) for r in rows] == [
        (op, t) for t in (1, 5) for op in ("ep_dispatch", "ep_experts", "ep_combine", "ep_fused_moe", "fused_moe",
                                           "cpu_limit", "cpu_limit")]
    for r in rows:
        assert r["check"] == "pass" and r["median_ms"] > 0 and r["threads_per_rank"] == 1, r
        assert len(r["per_rank_median_ms"]) == 2, r
    block = [r for r in rows if r["op"] == "ep_fused_moe"]
    assert all(0 < r["alltoall_share"] < 1 and r["alltoall_ms"] > 0 for r in block), block
    # the limits measured in the same run, and the experts' weight read and rate as fractions of them
    limits = [r for r in rows if r["op"] == "cpu_limit"]
    assert [r["impl"].split(":")[0] for r in limits] == ["read", "mm"] * 2 and all(
        r.get("gbps", 0) > 0 or r.get("tflops", 0) > 0 for r in limits), limits
    assert all(r["frac_read_bw"] > 0 and r["frac_mm"] > 0 for r in rows if r["op"] == "ep_experts"), rows
