"""The ``qwen3moe-kernels`` command: check, bench and compile-check, and the benchmark harness behind bench
(``qwen3moe_kernels.bench``).

The CLI runs in-process through ``main(argv)`` with ``--quick`` (Qwen3-30B-A3B widths, 16 experts) so the suite
stays fast; one test runs the installed console script to prove the entry point exists.
"""

import importlib
import inspect
import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from qwen3moe_kernels import cli, ops, reference
from qwen3moe_kernels.bench import checks, fused_moe, machine, model, report, timing

STEMS = ["fused_moe", "moe_permute", "rms_norm", "rope", "router_topk", "model"]


def test_check_quick_passes_and_prints_table(capsys, tmp_path):
    out_json = tmp_path / "check.json"
    rc = cli.main(["check", "--quick", "--dtype", "fp32", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for op in ("ops.fused_moe", "ops.rms_norm", "ops.fused_add_rms_norm", "ops.qk_norm_rope", "ops.router_topk",
               "ops.moe_sort", "ops.moe_align_block", "ops.moe_permute", "ops.moe_unpermute", "ops.moe_experts",
               "ops.rope"):
        assert f"\n{op} " in text, op
    assert "max abs err" in text and "tolerance" in text and "implementation that ran" in text
    data = json.loads(out_json.read_text())
    assert data["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = data["results"]
    assert rows and all(r["result"] == "pass" for r in rows)
    assert all(r["ran"] != "-" for r in rows)  # every row says which implementation ran


def test_check_fails_on_a_wrong_op(monkeypatch, capsys):
    """A kernel that is off by a little more than the tolerance makes check exit non-zero and says which."""

    def wrong_rms_norm(x, weight, eps):
        return reference.rms_norm(x, weight, eps) * (1 + 1e-4)

    monkeypatch.setattr(ops, "rms_norm", wrong_rms_norm)
    rc = cli.main(["check", "--quick", "--dtype", "fp32", "--ops", "rms_norm"])
    text = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in text.splitlines() if ln.startswith("ops.rms_norm "))
    assert "FAIL" in line
    assert "ops.fused_add_rms_norm" in text and "0/2 passed" not in text and "1/2 passed" in text


def test_check_reports_a_crash(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "qk_norm_rope", broken)
    rc = cli.main(["check", "--quick", "--dtype", "fp32", "--ops", "qk_norm_rope"])
    text = capsys.readouterr().out
    assert rc == 1 and "ERROR" in text and "kernel exploded" in text


def test_check_compare_rules():
    x = torch.randn(8, 16)
    assert cli._compare(x, x.clone(), "elementwise", torch.float32)[2]
    assert not cli._compare(x + 1e-3, x, "elementwise", torch.float32)[2]
    ids = torch.arange(6, dtype=torch.int32)
    assert cli._compare(ids, ids.clone(), "exact", torch.float32)[2]
    assert not cli._compare(ids.flip(0), ids, "exact", torch.float32)[2]
    assert not cli._compare(x[:4], x, "elementwise", torch.float32)[2]  # shape mismatch
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert not cli._compare(nan, x, "elementwise", torch.float32)[2]
    # low precision against an fp32 reference: twice PyTorch's own error passes, far more fails
    ref32 = torch.randn(64, 64)
    lowp = ref32.bfloat16()
    assert cli._compare(lowp, lowp, "gemm", torch.bfloat16, ref32)[2]
    assert not cli._compare((ref32 * 1.1).bfloat16(), lowp, "gemm", torch.bfloat16, ref32)[2]


def test_bench_quick_writes_json_and_table(capsys, tmp_path):
    out = tmp_path / "b.json"
    rc = cli.main(["bench", "--quick", "--tokens", "1,4", "--ops", "fused_moe", "--out", str(out),
                   "--budget", "0.05"])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    m = data["machine"]
    for key in ("cpu_model", "cpu_capability", "torch", "triton", "transformers", "git_commit"):
        assert key in m
    assert data["config"]["dtype"] in ("bf16", "fp32") and data["config"]["dtype_reason"]
    limits = [r for r in data["results"] if r["op"] == "cpu_limit"]
    rows = [r for r in data["results"] if r["op"] != "cpu_limit"]
    assert {r["op"] for r in rows} == {"fused_moe", "fused_moe fwd+bwd"}  # a stem named: forward and fwd+bwd
    # on a CPU the read bandwidth and the mm rate, timed with the block's forward at every T, and its fractions
    assert sorted((r["tokens"], r["impl"].split(":")[0]) for r in limits) == [(1, "mm"), (1, "read"), (4, "mm"),
                                                                             (4, "read")]
    assert all(r["gbps"] > 0 for r in limits if r["impl"].startswith("read"))
    assert all(r["tflops"] > 0 for r in limits if r["impl"].startswith("mm"))
    fwd = [r for r in rows if r["op"] == "fused_moe"]
    assert all(r["weight_gbps"] > 0 and r["frac_read_bw"] > 0 for r in fwd)
    assert all(r["frac_mm"] > 0 for r in fwd if r.get("tflops"))  # FLOPs where the shapes are a known model's
    impls = {r["impl"] for r in rows if r["op"] == "fused_moe"}
    assert {"fused", "eager", "transformers-eager", "transformers-qwen3moe_kernels"} <= impls
    for r in rows:  # the drop-in's registered experts ran under transformers' own router (and the row says so)
        if r["impl"] == "transformers-qwen3moe_kernels":
            assert "moe_experts=cpu" in r["ran"] and "router_topk" not in r["ran"], r
    assert {r["tokens"] for r in rows} == {1, 4}
    for r in rows:
        assert r["check"] == "pass", r
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["vs_eager"] > 0 and r["vs_transformers"] > 0
    assert "median ms" in text and "x eager" in text and "x transformers" in text
    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in text
    else:
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def _fake(run):
    return types.SimpleNamespace(run=run)


def test_bench_runs_the_registered_benchmarks(monkeypatch, tmp_path, capsys):
    """A benchmark's run(device, token_counts) rows join the table (with ratios); one that raises, or a stem that
    names no benchmark, is an error row, and bench then exits 1."""

    def fake_run(device, token_counts):
        return [dict(op="fake_op", impl=i, tokens=t, median_ms=m * t, p10_ms=m * t, p90_ms=m * t)
                for t in token_counts for i, m in (("fused", 1.0), ("eager", 2.0))]

    def broken_run(device, token_counts):
        raise ImportError("needs a GPU library")

    monkeypatch.setattr(cli, "BENCHMARKS", {"fake_op": _fake(fake_run), "broken": _fake(broken_run)})
    out = tmp_path / "r.json"
    argv = ["--tokens", "2,8", "--out", str(out), "--no-plot"]
    assert cli.main(["bench", "--ops", "fake_op", *argv]) == 0
    rc = cli.main(["bench", "--ops", "fake_op,broken,missing", *argv])
    text = capsys.readouterr().out
    assert rc == 1
    rows = json.loads(out.read_text())["results"]
    fused_rows = [r for r in rows if r.get("op") == "fake_op" and r["impl"] == "fused"]
    assert [r["vs_eager"] for r in fused_rows] == [2.0, 2.0]
    assert {r["op"] for r in rows if r.get("error")} == {"broken", "missing"}
    assert "needs a GPU library" in text and "no benchmark 'missing'" in text and "2 row(s) failed" in text


def test_bench_exits_1_on_an_error_row(monkeypatch, tmp_path, capsys):
    """A benchmark whose run() works but reports an error in a row (a wrong or crashed implementation)."""
    def run(device, token_counts, dtype=None):
        return [dict(op="x", impl="fused", tokens=1, median_ms=1.0),
                dict(op="x", impl="eager", tokens=1, error="wrong result: not timed")]

    monkeypatch.setitem(cli.BENCHMARKS, "half_broken", _fake(run))
    assert cli.main(["bench", "--ops", "half_broken", "--tokens", "1", "--out", str(tmp_path / "r.json"),
                     "--no-plot"]) == 1
    assert "wrong result" in capsys.readouterr().out


def test_bench_ops_all_includes_the_model_benchmark(monkeypatch, tmp_path, capsys):
    """--ops all = the default set plus the model benchmark (its help says so); the default leaves the model out,
    and on a CPU at full shapes fused_moe's forward + backward too (on a GPU it is in)."""
    calls = []

    def fake(stem):
        def run(device, token_counts, dtype=None):
            return [dict(op=stem, impl="fused", tokens=t, median_ms=1.0) for t in token_counts]

        return _fake(run)

    def block_run(device, token_counts, dtype=None, backward=True):
        calls.append(backward)
        ops_ = ["fused_moe"] + (["fused_moe fwd+bwd"] if backward else [])
        return [dict(op=op, impl="fused", tokens=t, median_ms=1.0) for op in ops_ for t in token_counts]

    monkeypatch.setattr(cli, "BENCHMARKS", {"fused_moe": _fake(block_run), "fake_op": fake("fake_op"),
                                            "model": fake("model")})

    def ops_run(*flags):
        assert cli.main(["bench", *flags, "--device", "cpu", "--tokens", "1", "--out", str(tmp_path / "r.json"),
                         "--no-plot"]) == 0
        return {r["op"] for r in json.loads((tmp_path / "r.json").read_text())["results"]}

    assert ops_run("--ops", "all") == {"fake_op", "fused_moe", "fused_moe fwd+bwd", "model"} and calls == [True]
    assert ops_run() == {"fake_op", "fused_moe"} and calls[-1] is False
    assert "left out of the default CPU run" in capsys.readouterr().out
    assert ops_run("--quick") == {"fake_op", "fused_moe", "fused_moe fwd+bwd"}
    assert ops_run("--ops", "fused_moe") == {"fused_moe", "fused_moe fwd+bwd"}
    assert "left out" not in capsys.readouterr().out
    # the choice itself, on a GPU too: there the default includes the forward + backward
    assert cli.select_benchmarks("cuda", False, None) == (["fused_moe", "fake_op"], True, [])
    assert cli.select_benchmarks("cpu", True, None) == (["fused_moe", "fake_op"], True, [])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'all': all of those and the model benchmark" in help_text


# Every benchmark module's run() at tiny sizes, so a benchmark that breaks (a signature cli.py cannot call, a
# crash, a wrong implementation reported as an error row) fails here. The model benchmark has its own test below.
BENCH_STEMS = [stem for stem in STEMS if stem != "model"]
TINY = {"shapes": dict(hidden=64, moe_intermediate=32, experts=8, top_k=2), "hidden": 64, "budget_s": 0.01,
        "min_runs": 2}


@pytest.mark.parametrize("stem", BENCH_STEMS)
def test_every_benchmark_runs_at_tiny_size(stem):
    rows = cli._call_run(cli.BENCHMARKS[stem].run, "cpu", [1], torch.float32, **TINY)
    assert rows, stem
    for r in rows:
        assert not r.get("error") and r.get("check") != "FAIL", r
        assert r["op"] and r["impl"] and r["tokens"] == 1 and r["median_ms"] > 0, r
    if stem == "fused_moe":  # the forward of all five, then forward + backward of ours, the reference and transformers
        # (and on a CPU the read bandwidth and mm rate timed with the forward)
        assert {r["op"] for r in rows} == {"fused_moe", "fused_moe fwd+bwd", "cpu_limit"}
        assert {r["impl"] for r in rows if r["op"] == "fused_moe"} == set(fused_moe.IMPLS)
        assert {r["impl"] for r in rows if r["op"] == "fused_moe fwd+bwd"} == {
            "fused", "eager", "transformers-eager", "transformers-grouped_mm"}


def test_fused_moe_benchmark_forward_only():
    """backward=False (the default CPU run at full shapes): the forward rows alone, every one checked and timed."""
    rows = fused_moe.run("cpu", [1, 3], torch.float32, shapes=TINY["shapes"], backward=False, budget_s=0.01,
                         min_runs=2, log=None)
    rows = [r for r in rows if r["op"] != "cpu_limit"]
    assert {r["op"] for r in rows} == {"fused_moe"} and {r["tokens"] for r in rows} == {1, 3}
    assert {r["impl"] for r in rows} == set(fused_moe.IMPLS)
    assert all(r["check"] == "pass" and r["median_ms"] > 0 for r in rows), rows


def test_each_stem_is_a_package_benchmark_with_a_suite():
    """One stem per benchmark: ``qwen3moe_kernels.bench.<stem>`` (run(), no pytest) and the suite
    ``benchmarks/bench_<stem>.py``; bench runs exactly these."""
    assert list(cli.BENCHMARKS) == STEMS
    suites = Path(__file__).resolve().parent.parent / "benchmarks"
    assert sorted(p.stem for p in suites.glob("bench_*.py")) == sorted(f"bench_{s}" for s in STEMS)
    for stem in STEMS:
        mod = importlib.import_module(f"qwen3moe_kernels.bench.{stem}")
        assert cli.BENCHMARKS[stem] is mod and callable(mod.run), stem
        assert list(inspect.signature(mod.run).parameters)[:3] == ["device", "token_counts", "dtype"], stem
        assert "pytest" not in inspect.getsource(mod), stem


def test_compile_check_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qwen3moe_kernels.tools.compile_check", None)
    assert cli.main(["compile-check"]) == 2
    assert "qwen3moe_kernels.tools.compile_check is missing" in capsys.readouterr().err


def test_compile_check_passes_arguments_through(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    monkeypatch.setitem(sys.modules, "qwen3moe_kernels.tools.compile_check", types.SimpleNamespace(main=fake_main))
    assert cli.main(["compile-check", "--arch", "90", "--help"]) == 3
    assert seen["argv"] == ["--arch", "90", "--help"]


def test_console_script_is_installed():
    exe = shutil.which("qwen3moe-kernels") or str(__import__("pathlib").Path(sys.executable).parent / "qwen3moe-kernels")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("check", "bench", "compile-check"):
        assert cmd in res.stdout


# ------------------------------------------------------------------------------------------ the harness


def test_summarize_quantiles():
    s = timing.summarize([float(i) for i in range(1, 12)])  # 1..11
    assert s["median_ms"] == 6.0 and s["p10_ms"] == 2.0 and s["p90_ms"] == 10.0 and s["runs"] == 11


def test_time_fn_rotates_inputs_and_honours_min_runs():
    seen = []
    s = timing.time_fn(lambda x: seen.append(x), [(0,), (1,), (2,)], "cpu", warmup=1, min_runs=7, budget_s=0.0)
    assert s["runs"] == 7
    assert seen == [0, 0, 1, 2, 0, 1, 2, 0]  # one warm-up, then rotation through every input set


def test_time_interleaved_alternates_implementations():
    calls = []
    fns = {"a": lambda x: calls.append(("a", x)), "b": lambda x: calls.append(("b", x))}
    got = timing.time_interleaved(fns, [(0,), (1,)], "cpu", warmup=1, min_runs=3, budget_s=0.0)
    assert {n: s["runs"] for n, s in got.items()} == {"a": 3, "b": 3}
    # warm-ups, then one call of each per round on the same input set, rotating the sets and who goes first
    assert calls == [("a", 0), ("b", 0), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 0), ("b", 0)]
    slow = {"fast": lambda: None, "slow": lambda: time.sleep(0.02)}
    got = timing.time_interleaved(slow, [()], "cpu", warmup=0, min_runs=2, budget_s=0.03)
    assert got["slow"]["runs"] == 2 and got["fast"]["runs"] == 200  # each stops on its own budget / max_runs


def test_cpu_dtype_choice(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f"})
    dtype, why = machine.cpu_bench_dtype()
    assert dtype == torch.float32 and "emulated" in why
    assert machine.default_dtype("cpu") == torch.float32 and machine.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert machine.cpu_bench_dtype()[0] == torch.bfloat16


def test_block_check_catches_a_wrong_block():
    w = fused_moe.make_moe_weights(64, 32, 8, torch.float32, "cpu")
    x = torch.randn(5, 64)
    ref = reference.fused_moe(x, w["router_weight"], w["w_gate_up"], w["w_down"], 2, True)[0]
    assert checks.check_moe_block(ref.clone(), x, w, 2, ref)[2]
    assert not checks.check_moe_block(ref * 1.01, x, w, 2, ref)[2]
    xb = x.bfloat16()
    wb = {n: t.bfloat16() for n, t in w.items()}
    refb = reference.fused_moe(xb, wb["router_weight"], wb["w_gate_up"], wb["w_down"], 2, True)[0]
    assert checks.check_moe_block(refb, xb, wb, 2, refb)[2]
    assert not checks.check_moe_block(refb * 1.1, xb, wb, 2, refb)[2]
    # the public fp32 experts reference is reference.moe_experts computed in fp32
    w_, ids = reference.router_topk(torch.nn.functional.linear(x, w["router_weight"]), 2, True)
    torch.testing.assert_close(checks.experts_fp32(x, w["w_gate_up"], w["w_down"], ids, w_),
                               reference.moe_experts(x, w["w_gate_up"], w["w_down"], ids, w_))


def test_block_rates_use_the_roofline_cost_model_and_a_dtype_aware_peak(monkeypatch):
    """One cost model (roofline.op_cost) for the block's TFLOP/s and GB/s, and a % of peak only where the
    measured peak is of the row's dtype (the bf16 matmul rate: bf16/fp16 rows on a GPU)."""
    from qwen3moe_kernels import roofline

    for T in (1, 512):
        flops, nbytes, name = fused_moe.moe_block_cost(T, fused_moe.QWEN3_30B_A3B, torch.bfloat16)
        assert name == "Qwen3-30B-A3B"
        assert (flops, nbytes) == roofline.op_cost("fused_moe", "Qwen3-30B-A3B", T, "bf16")
    quick = dict(fused_moe.QWEN3_30B_A3B, experts=16, top_k=4)
    assert fused_moe.moe_block_cost(1, quick, torch.bfloat16) == (None,) * 3
    measured = {"tflops": 800.0, "gbps": 4000.0}
    monkeypatch.setattr(roofline, "device_peak", lambda device, dtype=None: measured)
    assert machine.device_peak("cuda", torch.bfloat16) == measured
    assert machine.device_peak("cuda", torch.float16) == measured
    assert machine.device_peak("cuda", torch.float32) is None  # no fp32/tf32 matmul rate measured: no fraction
    assert machine.device_peak("cpu", torch.bfloat16) is None
    row = {"median_ms": 1.0}
    report.add_rates(row, 400e9, 1e9, machine.device_peak("cuda", torch.bfloat16))
    assert row["tflops"] == 400.0 and row["frac_peak"] == 50.0
    row32 = {"median_ms": 1.0}
    report.add_rates(row32, 400e9, 1e9, machine.device_peak("cuda", torch.float32))
    assert row32["tflops"] == 400.0 and "frac_peak" not in row32
    # the op benchmarks' copy bandwidth is the same measurement, in any dtype; none off the GPU
    machine.copy_bandwidth.cache_clear()
    try:
        assert machine.copy_bandwidth("cuda") == 4000.0 and machine.copy_bandwidth("cpu") is None
    finally:
        machine.copy_bandwidth.cache_clear()


def test_add_ratios():
    rows = [dict(op="a", dtype="bf16", tokens=1, impl="eager", median_ms=4.0),
            dict(op="a", dtype="bf16", tokens=1, impl="fused", median_ms=1.0),
            dict(op="a", dtype="bf16", tokens=1, impl="transformers-eager", median_ms=8.0),
            dict(op="a", dtype="bf16", tokens=1, impl="transformers-grouped_mm", median_ms=2.0)]
    report.add_ratios(rows)
    fused_row = rows[1]
    assert fused_row["vs_eager"] == 4.0 and fused_row["vs_transformers"] == 2.0
    assert fused_row["transformers_baseline"] == "transformers-grouped_mm"


def test_cuda_graphed_needs_cuda_and_cpu_block_has_no_graph_rows():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        timing.cuda_graphed(lambda a: a, [(torch.ones(1),)])
    rows = fused_moe.run_forward("cpu", [1], torch.float32, {"hidden": 32, "moe_intermediate": 16, "experts": 4,
                                 "top_k": 2}, impls=["fused"], budget_s=0, min_runs=1, log=None, limits=False)
    assert [r["impl"] for r in rows] == ["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_graph_rows_cuda():
    """On CUDA the capturable implementations get a checked, timed "+cuda_graph" row."""
    rows = fused_moe.run_forward("cuda", [1, 64], torch.bfloat16, impls=["fused", "eager"], budget_s=0,
                                 min_runs=3, memory=False, log=None)
    by = {(r["impl"], r["tokens"]): r for r in rows}
    for T in (1, 64):
        row = by[("fused" + fused_moe.GRAPHED, T)]
        assert row.get("check") == "pass" and row["median_ms"] > 0, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA timing and memory need a GPU")
def test_cuda_timing_and_memory():
    s = timing.time_fn(lambda a: a @ a, [(torch.randn(256, 256, device="cuda"),)], "cuda", min_runs=3, budget_s=0)
    assert s["median_ms"] > 0
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    assert timing.peak_memory_fwd_bwd(lambda: a @ a, "cuda") > 0


def test_check_discovers_op_modules(monkeypatch, capsys):
    """Functions of an ops/<stem>.py module named like a reference op (beside the public ops) are checked with the
    reference's arguments."""
    good = types.ModuleType("qwen3moe_kernels.ops.fakeop")
    good.rms_norm = lambda x, w, eps: reference.rms_norm(x, w, eps)  # a correct "kernel"
    good.router_topk = lambda logits, k, renorm: tuple(  # a kernel that breaks ties the wrong way round
        t.flip(-1).contiguous() for t in reference.router_topk(logits, k, renorm))
    good.swiglu = reference.swiglu  # merely imported from the reference: not an op of this module
    monkeypatch.setitem(sys.modules, "qwen3moe_kernels.ops.fakeop", good)
    monkeypatch.setattr(cli, "discover_op_modules", lambda: ["fakeop"])
    rc = cli.main(["check", "--quick", "--dtype", "fp32", "--ops", "fakeop"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("ops.")}
    assert set(lines) == {"ops.fakeop.rms_norm", "ops.fakeop.router_topk"}
    assert " pass " in lines["ops.fakeop.rms_norm"] and "FAIL" in lines["ops.fakeop.router_topk"]


def test_model_benchmark_runs_on_a_tiny_model():
    """qwen3moe_kernels.bench.model end to end on tiny shapes, so the model-level benchmark cannot rot unseen."""
    mod = model
    tiny = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, attn_implementation="eager",
                vocab_size=97)
    # 8 new tokens and 3 rounds: the decode time (generate 8 - generate 1) stays above scheduler noise
    rows = mod.run("cpu", [1, 8], torch.float32, layers=1, decode_tokens=8, runs=3, log=None, config_overrides=tiny)
    by = {(r["op"], r["impl"]): r for r in rows}
    assert {impl for _, impl in by} == set(mod.VARIANTS)  # the thin model's rows too, by default
    for impl in mod.VARIANTS:
        pre, dec = by[("model-prefill", impl)], by[("model-decode", impl)]
        assert pre["check"] == "pass" and pre["tokens"] == 8 and pre["tokens_per_s"] > 0, pre
        assert pre["rel_err"] < 1e-4, pre  # fp32: every variant computes transformers' logits
        # timed every round; on a loaded 2-core box generate(8) - generate(1) may drown in noise: then the row
        # must say so instead of printing a number
        assert dec["runs"] == 3 and dec["generate_ms"] > 0 and dec["generate_1_ms"] > 0, dec
        assert dec.get("tokens_per_s", 0) > 0 or dec["error"].startswith("decode not measurable"), dec
        assert dec["same_greedy_tokens"] is True, impl
        assert pre["vs_eager"] > 0 and pre["vs_transformers_eager"] > 0 and pre["vs_transformers"] > 0
    assert by[("model-prefill", "qwen3moe_kernels-eager")]["vs_eager"] == 1.0  # x eager: vs the thin reference
    assert by[("model-prefill", "transformers")]["vs_transformers_eager"] == 1.0
    assert "fused_moe=cpu" in by[("model-decode", "qwen3moe_kernels-fused")]["ran"]
    # the patched transformers model: transformers' block calling our router top-k and experts
    patched = by[("model-decode", "transformers+qwen3moe_kernels")]["ran"]
    assert "router_topk=cpu" in patched and "moe_experts=cpu" in patched, patched
    registered = by[("model-decode", "transformers-qwen3moe_kernels")]["ran"]  # our experts, transformers' router
    assert "moe_experts=cpu" in registered and "router_topk" not in registered, registered
    assert "fused_moe" not in by[("model-decode", "qwen3moe_kernels-eager")]["ran"]
    text = mod.table(rows)
    assert "x transformers eager" in text and "qwen3moe_kernels-fused" in text
