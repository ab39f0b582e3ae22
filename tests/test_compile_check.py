"""compile-check in CI: every shipped GPU kernel config compiles for sm_90 and sm_100 without spills, within the
shared-memory limit, and (GEMMs) on tensor cores; every launched @triton.jit kernel has a compile spec.

No GPU is involved: triton.compile targets GPUTarget("cuda", 90|100, 32) and Triton's own cuobjdump reads the
cubin. The machinery itself is tested on two tiny kernels defined here (a tl.dot GEMM and an elementwise kernel),
on a deliberately oversized tile, on a "GEMM" without tl.dot, and on fixed cuobjdump text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from qwen3moe_kernels import compile_check as cc  # noqa: E402
from qwen3moe_kernels.kernels.spec import CompileSpec  # noqa: E402

# The tiny kernels are wrapped in JITFunction directly rather than with @triton.jit: other test modules set
# TRITON_INTERPRET=1 for their interpreter runs, and under it @triton.jit returns an interpreter object that cannot
# be compiled. The real kernels are checked in a subprocess with TRITON_INTERPRET unset, for the same reason.
jit = JITFunction


@jit
def _tiny_gemm(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # C[BM, BN] = A[BM, K] @ B[K, BN], one program; row-major, K a multiple of BK
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@jit
def _scale(x):
    return x * 2.0


@jit
def _tiny_elementwise(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, _scale(tl.load(x_ptr + offs, mask=m)), mask=m)


@jit
def _not_a_gemm(a_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr):
    # "GEMM" that multiplies elementwise: no tl.dot, so no tensor-core instruction
    r = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(c_ptr + r, tl.load(a_ptr + r) * 3.0)


GEMM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32",
            "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}


def gemm_spec(bm=128, bn=128, bk=64, dtype="bf16", stages=3, label=None, warps=8):
    sig = dict(GEMM_SIG, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}")
    return CompileSpec("_tiny_gemm", _tiny_gemm, sig, {"BM": bm, "BN": bn, "BK": bk},
                       label or f"{dtype} BM={bm} BN={bn} BK={bk}", num_warps=warps, num_stages=stages, gemm=True)


def elementwise_spec():
    return CompileSpec("_tiny_elementwise", _tiny_elementwise,
                       {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                       "fp16 BLOCK=1024", num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------- the real check


def test_compile_check_all_shipped_kernels(tmp_path):
    """The CI gate: exactly what `qwen3moe-kernels compile-check` runs, over whatever kernels exist now."""
    out = tmp_path / "compile_check.json"
    p = subprocess.run([sys.executable, "-m", "qwen3moe_kernels.compile_check", "--json", str(out), "--jobs", "2"],
                       env=cc.clean_env(), capture_output=True, text=True, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == []
    for row in report["triton"]:  # every spec compiled for both archs
        assert row["registers"] is not None and row["shared_bytes"] is not None, row


def test_every_launched_triton_kernel_has_a_compile_spec():
    # discovered kernels vs compile_specs(); also each spec's signature names exactly its kernel's arguments
    code = ("import json; from qwen3moe_kernels import compile_check as cc; d = cc.discover(); "
            "print(json.dumps({'errors': d.errors, 'uncovered': d.uncovered, 'specs': len(d.specs), "
            "'modules': d.modules}))")
    p = subprocess.run([sys.executable, "-c", code], env=cc.clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert not d["errors"], d["errors"]
    assert not d["uncovered"], f"@triton.jit kernels without a CompileSpec in compile_specs(): {d['uncovered']}"


def test_main_leaves_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cc.main(["--json", str(tmp_path / "x.json"), "--no-cuda", "--arch", "90"]) == 0
    assert json.loads((tmp_path / "x.json").read_text())["archs"] == ["sm_90"]


# --------------------------------------------------------------------------- the machinery, on tiny kernels


@pytest.mark.parametrize("arch", [90, 100])
def test_tiny_gemm_uses_tensor_cores(arch):
    # (found by this check: the same kernel at 64x64x32 in 4 warps spills 24 B on sm_100 with triton 3.8)
    row = cc.compile_spec(gemm_spec(), arch)
    assert row.ok, row.problems
    assert row.registers and 0 < row.registers <= 255
    assert row.spill_bytes == 0
    assert 0 < row.shared_bytes <= cc.LIMITS[arch].smem_per_block
    assert 0 < row.occupancy <= 1
    family = "wgmma" if arch == 90 else "tcgen05"  # a 128x128 bf16 tile takes the arch's own tensor-core path
    assert row.tensor_cores[family] > 0, row.tensor_cores


def test_elementwise_and_helper_discovery():
    row = cc.compile_spec(elementwise_spec(), 90)
    assert row.ok and not any(row.tensor_cores.values())
    mod = types.ModuleType(__name__)
    mod.__dict__.update(_tiny_elementwise=_tiny_elementwise, _scale=_scale, _tiny_gemm=_tiny_gemm)
    # _scale is called from _tiny_elementwise (inlined), so only the two launched kernels need specs
    assert set(cc.launched_jit_kernels(mod)) == {"_tiny_elementwise", "_tiny_gemm"}


def test_discover_flags_a_kernel_without_spec(monkeypatch):
    mod = types.ModuleType("qwen3moe_kernels.kernels._fake_for_test")
    mod.__dict__.update(_tiny_gemm=_tiny_gemm, _tiny_elementwise=_tiny_elementwise, _scale=_scale)
    mod.compile_specs = lambda: [gemm_spec()]
    _tiny_gemm.fn.__module__, old = mod.__name__, _tiny_gemm.fn.__module__
    _tiny_elementwise.fn.__module__, old2 = mod.__name__, _tiny_elementwise.fn.__module__
    try:
        monkeypatch.setitem(__import__("sys").modules, mod.__name__, mod)
        d = cc.discover([mod.__name__])
    finally:
        _tiny_gemm.fn.__module__, _tiny_elementwise.fn.__module__ = old, old2
    assert d.uncovered == [(mod.__name__, "_tiny_elementwise")]
    assert len(d.specs) == 1


def test_huge_tile_is_over_the_shared_memory_limit():
    # 256x256 bf16 A/B tiles with BK=256 in 4 stages: (256*256*2)*2*4 B = 1 MiB of staging buffers
    row = cc.compile_spec(gemm_spec(256, 256, 256, stages=4, label="huge"), 90)
    assert not row.ok
    assert any("compile error" in p or "shared memory" in p for p in row.problems), row.problems
    if row.shared_bytes is not None:  # Triton compiled it: then the shared-memory rule must be what failed
        assert row.shared_bytes > cc.LIMITS[90].smem_per_block
        assert any("per-block limit" in p for p in row.problems)


def test_gemm_without_dot_is_flagged():
    spec = CompileSpec("_not_a_gemm", _not_a_gemm, {"a_ptr": "*fp16", "c_ptr": "*fp16", "BM": "constexpr",
                                                    "BN": "constexpr"}, {"BM": 64, "BN": 64}, "no dot", gemm=True)
    row = cc.compile_spec(spec, 90)
    assert not row.ok and any("tensor-core" in p for p in row.problems), row.problems


def test_compile_error_is_a_failure_not_an_exception():
    spec = CompileSpec("_tiny_gemm", _tiny_gemm, GEMM_SIG, {"BM": 63, "BN": 64, "BK": 32}, "BM not a power of 2",
                       gemm=True)
    row = cc.compile_spec(spec, 90)
    assert not row.ok and row.problems[0].startswith("compile error")


def test_compile_all_pool_matches_serial():
    specs = [gemm_spec(), elementwise_spec()]
    serial = cc.compile_all(specs, (90,), jobs=1)
    pooled = cc.compile_all(specs, (90,), jobs=2)
    key = lambda r: (r.kernel, r.registers, r.shared_bytes, r.spill_bytes, r.ok)  # noqa: E731
    assert [key(r) for r in serial] == [key(r) for r in pooled]


# ---------------------------------------------------------------------------------- parser, occupancy

CUOBJDUMP_TEXT = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:448 CONSTANT[4]:376
 Function _Z3fooPf:
  REG:40 STACK:16 SHARED:9216 LOCAL:8 CONSTANT[0]:976 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barv:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_100a

Resource usage:
 Function _Z3fooPf:
  REG:32 STACK:0 SHARED:9216 LOCAL:0 CONSTANT[0]:976 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    rows = cc.parse_resource_usage(CUOBJDUMP_TEXT)
    assert [(r["arch"], r["function"], r["reg"], r["stack"], r["shared"], r["local"]) for r in rows] == [
        ("sm_90a", "_Z3fooPf", 40, 16, 9216, 8),
        ("sm_90a", "_Z3barv", 255, 0, 0, 0),
        ("sm_100a", "_Z3fooPf", 32, 0, 9216, 0),
    ]
    # a bare cubin (what Triton produces) has no arch line
    bare = "Resource usage:\n Common:\n  GLOBAL:0\n Function mm:\n  REG:254 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584\n"
    assert cc.parse_resource_usage(bare) == [
        {"arch": None, "function": "mm", "reg": 254, "stack": 0, "shared": 1024, "local": 0, "constant0": 584}]


def test_count_tensor_core_ops():
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;\n wgmma.fence.sync.aligned;\n" \
          "tcgen05.mma.cta_group::1.kind::f16 [%r1];\n mma.sync.aligned.m16n8k16.row.col.f32.bf16;\n"
    assert cc.count_tensor_core_ops(ptx) == {"wgmma": 1, "tcgen05": 1, "mma.sync": 1}


def test_occupancy_estimate():
    L = cc.LIMITS[90]
    # 32 regs x 4 warps, no shared: 64 warps fit by registers and by warp slots: 100%
    assert cc.estimate_occupancy(32, 0, 4, L) == {"blocks_per_sm": 16, "warps_per_sm": 64, "occupancy": 1.0,
                                                  "limiter": "warps"}
    # 128 regs: 4096 per warp -> 16 warps -> 4 blocks of 4 warps: 25%, limited by registers
    o = cc.estimate_occupancy(128, 0, 4, L)
    assert (o["blocks_per_sm"], o["occupancy"], o["limiter"]) == (4, 0.25, "registers")
    # 33 regs round up to 40 per thread (1280 per warp): 51 warps -> 12 blocks of 4
    assert cc.estimate_occupancy(33, 0, 4, L)["blocks_per_sm"] == 12
    # 100 KB of shared memory: (228 KB) // (100 KB + 1 KB) = 2 blocks
    o = cc.estimate_occupancy(32, 100 * 1024, 4, L)
    assert (o["blocks_per_sm"], o["limiter"]) == (2, "shared")
    # over the per-block limit: nothing fits
    assert cc.estimate_occupancy(32, 228 * 1024, 4, L)["blocks_per_sm"] == 0


def test_check_row_rules_and_waivers(monkeypatch):
    L = cc.LIMITS[100]
    r = cc.check_row(cc.Row("k", "c", "sm_100", spill_bytes=8, shared_bytes=L.smem_per_block + 1, gemm=True,
                            tensor_cores={"wgmma": 0, "tcgen05": 0, "mma.sync": 0}), L)
    assert not r.ok and len(r.problems) == 3
    assert not cc.check_row(cc.Row("k", "c", "sm_100", tmem_cols=1024), L).ok
    monkeypatch.setitem(cc.WAIVERS, ("k", "sm_100a"), "test reason")
    r = cc.check_row(cc.Row("k", "c", "sm_100a", spill_bytes=8, shared_bytes=0), L)
    assert r.ok and "test reason" in r.waived
    r = cc.check_row(cc.Row("k", "c", "sm_100a", spill_bytes=8, shared_bytes=L.smem_per_block + 1), L)
    assert not r.ok  # a waiver covers spills only


def test_short_cuda_name():
    d = "void qwen3moe::(anonymous namespace)::unpermute_kernel<c10::BFloat16, 8>(c10::BFloat16 const*, long)"
    assert cc.short_cuda_name(d) == "unpermute_kernel<c10::BFloat16, 8>"
    assert cc.short_cuda_name("qwen3moe::(anonymous namespace)::sort_scan_kernel(int*, long)") == "sort_scan_kernel"


def test_cuda_report_handles_no_library_and_cpu_only(tmp_path):
    rows, notes = cc.cuda_report(str(tmp_path / "missing.so"))
    assert rows == [] and notes
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF not really")
    rows, notes = cc.cuda_report(str(fake))
    assert rows == [] and notes


# ------------------------------------------------------------------------------- roofline floors (limits)


def test_roofline_floors_hand_computed():
    from qwen3moe_kernels import roofline as rl

    # 30B-A3B grouped SwiGLU at T=4096: 2*R*H*2I + 2*R*I*H + 4*R*I FLOPs with R = T*k routed rows
    R, H, I = 4096 * 8, 2048, 768
    f, nb = rl.op_cost("grouped_swiglu", "Qwen3-30B-A3B", 4096, "bf16")
    assert f == 2.0 * R * H * 2 * I + 2.0 * R * I * H + 4.0 * R * I
    assert nb >= 128 * 3 * H * I * 2 * 0.999  # every expert hit at this T: all weights read once
    lim = rl.limit_time(f, nb, {"tflops": 800.0, "gbps": 3000.0})
    # 256 rows per expert at T=4096: 256 FLOP/B, just under the H100 ridge (800/3 = 267): still memory bound
    assert lim["bound"] == "memory" and abs(lim["compute_us"] - f / 800e12 * 1e6) < 1e-9
    f2, nb2 = rl.op_cost("grouped_swiglu", "Qwen3-30B-A3B", 16384, "bf16")
    assert rl.limit_time(f2, nb2, {"tflops": 800.0, "gbps": 3000.0})["bound"] == "compute"
    # decode T=1 reads 8 experts' weights: memory bound
    f1, nb1 = rl.op_cost("grouped_swiglu", "Qwen3-30B-A3B", 1, "bf16")
    assert abs(nb1 - (8 * 3 * H * I * 2 + 2 * 2 * 8 * H)) < 1e-6
    assert rl.limit_time(f1, nb1, rl.peak_for("H100")[0])["bound"] == "memory"
    assert rl.active_experts(1, 128, 8) == pytest.approx(8.0)
    rows = rl.floors("B200")  # no measured B200 peak: the label must say nominal
    assert rows and all("NOMINAL" in r["limit"] for r in rows)
    assert all(r["floor_us"] > 0 for r in rows if r["op"] != "moe_permute" or r["tokens"] > 0)
    assert rl.device_peak("cpu") is None
    with pytest.raises(ValueError):
        rl.op_cost("nope", "Qwen3-30B-A3B", 1)


# ------------------------------------------------------------------------- python/gpu_run.py's plumbing


def _gpu_run():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "python" / "gpu_run.py"
    spec = importlib.util.spec_from_file_location("gpu_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_run_steps_respect_the_budget(tmp_path):
    import sys

    g = _gpu_run()
    r = g.Runner(budget_s=30)
    assert r.run("ok", [sys.executable, "-c", "print('hi')"], 20)["status"] == "ok"
    assert r.run("fails", [sys.executable, "-c", "import sys; sys.exit(3)"], 20)["rc"] == 3
    assert r.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 6)["status"] == "timed out"
    assert r.run("no time", [sys.executable, "-c", "pass"], 20, reserve_s=1000)["status"] == "skipped"
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    s = g.junit_summary(xml)
    assert (s["tests"], s["failures"], s["skipped"], s["failed"]) == (3, 1, 1, ["t::b"])
    if not __import__("torch").cuda.is_available():
        assert g.main(["--out-dir", str(tmp_path)]) == 2  # says so and writes nothing without a GPU


@jit
def _row_copy(x_ptr, y_ptr, stride, BLOCK: tl.constexpr):
    # one row per program at a runtime stride: vectorisable only if the JIT knows stride % 16 == 0
    offs = tl.arange(0, BLOCK)
    row = tl.program_id(0).to(tl.int64) * stride
    tl.store(y_ptr + row + offs, tl.load(x_ptr + row + offs))


def _ptx(spec):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cc.unwrap_jit(spec.fn)
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), spec.divisibility_attrs(list(fn.arg_names)))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def test_specs_compile_the_variant_the_jit_launches():
    # The JIT marks 16-aligned pointers and ints that are multiples of 16 as divisible; a spec that states the
    # ints' values gets the same vectorised variant (128-bit loads), one that does not gets scalar loads.
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "stride": "i32", "BLOCK": "constexpr"}
    hinted = CompileSpec("_row_copy", _row_copy, sig, {"BLOCK": 1024}, "stride=2048", ints={"stride": 2048})
    odd = CompileSpec("_row_copy", _row_copy, sig, {"BLOCK": 1024}, "stride=2047", ints={"stride": 2047})
    assert hinted.divisibility_attrs(["x_ptr", "y_ptr", "stride", "BLOCK"]) == {
        (0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    assert "ld.global.v4" in _ptx(hinted)
    assert "ld.global.v4" not in _ptx(odd)
