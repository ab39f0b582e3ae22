"""compile-check in CI: every shipped GPU kernel config compiles for sm_90 and sm_100 without spills, within the
shared-memory limit, and (GEMMs) on tensor cores; every launched @triton.jit kernel has a compile spec.

No GPU is involved: triton.compile targets GPUTarget("cuda", 90|100, 32) and Triton's own cuobjdump reads the
cubin. The machinery itself is tested on two tiny kernels defined here (a tl.dot GEMM and an elementwise kernel),
on a deliberately oversized tile, on a "GEMM" without tl.dot, and on fixed cuobjdump text. The full check runs
once per session of this module (the ``gate`` fixture) and serves both the gate and the staleness test of the
committed JSON.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from qwen3moe_kernels.tools import compile_check as cc  # noqa: E402
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


def gemm_spec(bm=128, bn=128, bk=64, dtype="bf16", stages=3, label=None, warps=8, native_mma=None):
    # the tile is named BM here, not BLOCK_M, so the native-instruction rule is stated explicitly
    sig = dict(GEMM_SIG, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}")
    return CompileSpec("_tiny_gemm", _tiny_gemm, sig, {"BM": bm, "BN": bn, "BK": bk},
                       label or f"{dtype} BM={bm} BN={bn} BK={bk}", num_warps=warps, num_stages=stages, gemm=True,
                       native_mma=bm >= 64 if native_mma is None else native_mma)


def elementwise_spec():
    return CompileSpec("_tiny_elementwise", _tiny_elementwise,
                       {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                       "fp16 BLOCK=1024", num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------- the real check


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """One run of exactly what `qwen3moe-kernels compile-check` runs (every kernel, both archs, the CUDA build):
    (the finished process, the JSON it wrote or None)."""
    out = tmp_path_factory.mktemp("compile_check") / "compile_check.json"
    cmd = [sys.executable, "-m", "qwen3moe_kernels.tools.compile_check", "--json", str(out), "--jobs", "2"]
    p = subprocess.run(cmd, env=cc.clean_env(), capture_output=True, text=True, timeout=900)
    return p, (json.loads(out.read_text()) if out.exists() else None)


def test_compile_check_all_shipped_kernels(gate):
    """The CI gate, over whatever kernels exist now. With QWEN3MOE_REQUIRE_CUDA_BUILD=1 (the GPU run) an extension
    without CUDA device code fails it too."""
    p, report = gate
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    assert report["ok"] and report["failures"] == []
    for row in report["triton"]:  # every spec compiled for both archs
        assert row["registers"] is not None and row["shared_bytes"] is not None, row
    if cc.cuda_build_required():
        assert report["cuda"], "QWEN3MOE_REQUIRE_CUDA_BUILD=1 but no CUDA kernel rows"


TABLE_TOOLS = ("triton", "ptxas", "ptxas-blackwell", "cuobjdump")  # what the Triton rows depend on


def test_compile_check_json_is_current(request):
    """benchmarks/results/compile_check.json is what compile-check computes now, when made with the same Triton,
    ptxas and cuobjdump (and, for the CUDA rows, nvcc) as this run; other tool versions give other numbers."""
    committed = json.loads(cc.DEFAULT_JSON.read_text())
    recorded, now = committed.get("versions", {}), cc.tool_versions()
    fix = ("run `qwen3moe-kernels compile-check` and commit benchmarks/results/compile_check.json with the kernel "
           "change")
    missing = [t for t in TABLE_TOOLS + ("nvcc",) if t not in recorded]
    assert not missing, f"the committed compile_check.json records no {missing} version (an older format): {fix}"
    other = {t: (recorded[t], now.get(t)) for t in TABLE_TOOLS if recorded[t] != now.get(t)}
    if other:
        pytest.skip(f"compile_check.json was made with other tools (committed, here): {other}")
    _, fresh = request.getfixturevalue("gate")  # the gate's run: nothing is compiled twice
    assert fresh is not None, "compile-check wrote no JSON (see test_compile_check_all_shipped_kernels)"
    parts = ["archs", "modules", "triton"] + (["cuda"] if recorded["nvcc"] == now.get("nvcc") else [])
    diff = cc.table_diff(committed, fresh, parts)
    assert not diff, (f"benchmarks/results/compile_check.json is stale ({len(diff)} difference(s)): {fix}.\n"
                      + "\n".join(diff[:30]))


@pytest.mark.build
def test_cuda_rows_pass_and_match_the_committed_table_for_this_build():
    """The extension's CUDA kernels, whatever archs this build holds (all, one, or none: a CPU-only build), pass
    compile-check's rules and equal the committed table's rows for the archs both hold."""
    rows, notes = cc.cuda_report()
    assert all(r.ok for r in rows), [f"{r.kernel} {r.arch}: {r.problems}" for r in rows if not r.ok]
    committed = json.loads(cc.DEFAULT_JSON.read_text())
    if committed["versions"].get("nvcc") != cc.tool_versions().get("nvcc"):
        pytest.skip(f"compile_check.json was made with nvcc {committed['versions'].get('nvcc')}")
    fresh = {"cuda_archs": sorted({r.arch for r in rows}), "cuda": [cc.row_json(r) for r in rows]}
    print(f"compared archs: {sorted(set(committed['cuda_archs']) & set(fresh['cuda_archs']))}; notes: {notes}")
    diff = cc.table_diff(committed, fresh, ["cuda"])
    assert not diff, ("benchmarks/results/compile_check.json is stale: run `qwen3moe-kernels compile-check` with "
                      "the default build and commit it.\n" + "\n".join(diff[:30]))


def test_every_launched_triton_kernel_has_a_compile_spec():
    # discovered kernels vs compile_specs(); also each spec's signature names exactly its kernel's arguments
    code = ("import json; from qwen3moe_kernels.tools import compile_check as cc; d = cc.discover(); "
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
    assert row.tc_rule == family  # and must: the rule for tiles of 64 rows or more


def test_narrow_gemm_tile_may_use_mma_sync():
    # a 16-row (decode) tile: Triton takes mma.sync on Hopper; accepted, and marked as such in the table
    row = cc.compile_spec(gemm_spec(16, 64, 64, warps=4), 90)
    assert row.ok, row.problems
    assert row.tc_rule == "narrow tile" and row.tensor_cores["mma.sync"] > 0 and not row.tensor_cores["wgmma"]
    assert "mma.sync" in cc.format_table([row]) and "(narrow tile)" in cc.format_table([row])
    # the same tile declared as needing the arch's own instructions fails
    row = cc.compile_spec(gemm_spec(16, 64, 64, warps=4, native_mma=True), 90)
    assert not row.ok and any("sm_90's own tensor-core instructions (wgmma" in p for p in row.problems), row.problems


def test_native_mma_rule_follows_block_m():
    sig = {"BLOCK_M": "constexpr"}
    spec = lambda bm, **kw: CompileSpec("k", None, sig, {"BLOCK_M": bm}, "l", gemm=True, **kw)  # noqa: E731
    assert spec(64).requires_native_mma() and spec(128).requires_native_mma()
    assert not spec(16).requires_native_mma() and not spec(32).requires_native_mma()
    assert not spec(128, native_mma=False).requires_native_mma()  # a spec may say otherwise, both ways
    assert spec(16, native_mma=True).requires_native_mma()
    assert not CompileSpec("k", None, sig, {"BLOCK_M": 128}, "l").requires_native_mma()  # not a GEMM
    L = cc.LIMITS[90]
    mma_only = {"wgmma": 0, "tcgen05": 0, "mma.sync": 8}
    r = cc.check_row(cc.Row("k", "c", "sm_90", gemm=True, tc_rule="wgmma", tensor_cores=dict(mma_only)), L)
    assert not r.ok and "mma.sync x8" in r.problems[0]
    r = cc.check_row(cc.Row("k", "c", "sm_100", gemm=True, tc_rule="tcgen05",
                            tensor_cores={"wgmma": 0, "tcgen05": 4, "mma.sync": 0}), cc.LIMITS[100])
    assert r.ok
    assert cc.check_row(cc.Row("k", "c", "sm_90", gemm=True, tc_rule="narrow tile", tensor_cores=mma_only), L).ok


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


def test_cuda_occupancy_uses_each_kernels_block_size():
    # 72 registers: 2304 per warp, 28 warps of registers per SM. At 128 threads (router_topk) 7 blocks = 28 warps;
    # at 512 (sort_scan) one block of 16 warps; a 256-thread assumption would have given 3 blocks = 24 warps.
    r = {"arch": "sm_90a", "function": "f", "reg": 72, "stack": 0, "shared": 0, "local": 0, "constant0": 0}
    topk = cc.cuda_row(r, "void qwen3moe::router_topk_kernel<float, 4, 1>(float const*, long)")
    scan = cc.cuda_row(r, "qwen3moe::(anonymous namespace)::sort_scan_kernel(int*, long)")
    assert (topk.num_warps, topk.occupancy, topk.ok) == (4, 28 / 64, True)
    assert (scan.num_warps, scan.occupancy, scan.ok) == (16, 16 / 64, True)
    unknown = cc.cuda_row(r, "void qwen3moe::new_kernel<float>(float*)")
    assert not unknown.ok and "CUDA_BLOCK_THREADS" in unknown.problems[0] and unknown.occupancy is None


def test_cuda_block_threads_table_matches_csrc():
    """Every __global__ kernel of csrc/*.cu is in CUDA_BLOCK_THREADS, and no other; each entry agrees with the
    kernel's __launch_bounds__ or its <<<grid, threads>>> launch (at least one of them)."""
    from pathlib import Path

    src = "\n".join(p.read_text() for p in sorted((Path(cc.PACKAGE_DIR).parent / "csrc").glob("*.cu")))
    consts = {n: int(v) for n, v in re.findall(r"(?:constexpr|const)\s+int\s+(\w+)\s*=\s*(\d+)\s*;", src)}
    consts.update({n: eval(e, {}, consts) for n, e in re.findall(r"dim3\s+.*\b(\w+)\(([\w\s*+]+)\);", src)})
    kernels = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(", src)
    assert {name for _, name in kernels} == set(cc.CUDA_BLOCK_THREADS)
    seen = set()
    for bounds, name in kernels:
        if bounds:
            assert eval(bounds, {}, consts) == cc.CUDA_BLOCK_THREADS[name], (name, bounds)
            seen.add(name)
    for name, threads in re.findall(r"\b(\w+)(?:<[^<>]*>)?<<<[^,]+,\s*([^,]+?)\s*,", src):
        try:
            value = eval(threads, {}, consts)
        except NameError:  # a size this regex cannot follow
            continue
        assert value == cc.CUDA_BLOCK_THREADS[name], (name, threads)
        seen.add(name)
    assert seen == set(cc.CUDA_BLOCK_THREADS), set(cc.CUDA_BLOCK_THREADS) - seen


def test_short_cuda_name():
    d = "void qwen3moe::(anonymous namespace)::unpermute_kernel<c10::BFloat16, 8>(c10::BFloat16 const*, long)"
    assert cc.short_cuda_name(d) == "unpermute_kernel<c10::BFloat16, 8>"
    assert cc.short_cuda_name("qwen3moe::(anonymous namespace)::sort_scan_kernel(int*, long)") == "sort_scan_kernel"


def test_cuda_report_handles_no_library_and_cpu_only(tmp_path, monkeypatch):
    monkeypatch.delenv(cc.REQUIRE_CUDA_ENV, raising=False)
    rows, notes = cc.cuda_report(str(tmp_path / "missing.so"))
    assert rows == [] and notes
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF not really")
    rows, notes = cc.cuda_report(str(fake))
    assert rows == [] and notes


def test_required_cuda_build_makes_a_cpu_only_build_fail(tmp_path, monkeypatch):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF not really")
    monkeypatch.setenv(cc.REQUIRE_CUDA_ENV, "1")
    for lib in (fake, tmp_path / "missing.so"):
        rows, notes = cc.cuda_report(str(lib))
        assert notes == [] and len(rows) == 1 and not rows[0].ok
        assert cc.REQUIRE_CUDA_ENV in rows[0].problems[0]
    monkeypatch.setattr(cc, "extension_library", lambda: str(fake))
    report = cc.run(archs=(90,), modules=[])  # what compile-check (and so the gate test) reports
    assert any(cc.REQUIRE_CUDA_ENV in f for f in report["failures"]), report["failures"]


def test_table_diff():
    row = {"kernel": "k", "config": "c", "arch": "sm_90", "registers": 32}
    old = {"archs": ["sm_90"], "triton": [row, dict(row, kernel="gone")]}
    new = {"archs": ["sm_90"], "triton": [dict(row, registers=40), dict(row, kernel="new")]}
    assert cc.table_diff(old, new, ["archs", "triton"]) == [
        "triton: removed ('gone', 'c', 'sm_90')", "triton: ('k', 'c', 'sm_90'): registers 32 -> 40",
        "triton: added ('new', 'c', 'sm_90')"]
    assert cc.table_diff(old, old) == []
    assert cc.table_diff({"archs": ["sm_90"]}, {"archs": ["sm_100"]}, ["archs"]) == ["archs: ['sm_90'] -> ['sm_100']"]


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


def test_roofline_tokens_backward_and_row_floor():
    from qwen3moe_kernels import roofline as rl

    # the CUDA bench's token counts and issue 4's are all in the table
    table = set(rl.DECODE_TOKENS + rl.PREFILL_TOKENS)
    assert {1, 8, 64, 512, 2048, 8192} <= table and {1, 8, 64, 512, 4096, 16384} <= table
    rows = rl.floors("H100")
    assert {r["tokens"] for r in rows} == table
    assert {(r["op"], r["direction"]) for r in rows if r["direction"] == "fwd+bwd"} == {("fused_moe", "fwd+bwd")}
    # grouped SwiGLU backward, 30B-A3B at T=4096: twice the forward GEMMs + 8 per [R, I] element; reads d(rows
    # out), rows in and the hit experts' weights, writes d(rows in) and all E experts' weight gradients
    R, H, I, E = 4096 * 8, 2048, 768, 128
    f, nb = rl.op_cost("grouped_swiglu", "Qwen3-30B-A3B", 4096, "bf16", backward=True)
    assert f == 2 * (2.0 * R * H * 2 * I + 2.0 * R * I * H) + 8.0 * R * I
    hit = rl.active_experts(4096, E, 8)
    assert nb == pytest.approx(2 * (3 * R * H + hit * 3 * H * I + E * 3 * H * I))
    # the block's forward + backward: the sum of its parts both ways, about 3x the forward FLOPs
    fwd = rl.op_cost("fused_moe", "Qwen3-30B-A3B", 4096)
    bwd = rl.op_cost("fused_moe", "Qwen3-30B-A3B", 4096, backward=True)
    assert bwd == tuple(map(sum, zip(*[rl.op_cost(p, "Qwen3-30B-A3B", 4096, backward=True) for p in rl.MOE_OPS])))
    assert 2.9 < (fwd[0] + bwd[0]) / fwd[0] < 3.1
    with pytest.raises(ValueError):
        rl.op_cost("rms_norm", "Qwen3-30B-A3B", 1, backward=True)
    # row_floor: what the bench calls per row
    peak = {"tflops": 800.0, "gbps": 3000.0, "device": "NVIDIA H100"}
    r = rl.row_floor("fused_moe", 4096, "Qwen3-30B-A3B", "bf16", "fwd+bwd", peak=peak)
    assert (r["flops"], r["bytes"]) == (fwd[0] + bwd[0], fwd[1] + bwd[1])
    assert r["floor_us"] == max(r["compute_us"], r["memory_us"]) and r["limit"] == "limit measured on NVIDIA H100"
    assert rl.row_floor("fused_moe", 8, peak=peak) == rl.row_floor("fused_moe", 8, "Qwen3-30B-A3B", peak=peak)
    # dims instead of a model name, and the experts actually hit instead of the expectation
    dims = {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8}
    assert rl.row_floor("fused_moe", 8, dims, peak=peak) == rl.row_floor("fused_moe", 8, peak=peak)
    few = rl.row_floor("grouped_swiglu", 8, dims, peak=peak, active=10)
    assert few["bytes"] == 10 * 3 * H * I * 2 + 2 * 2 * 8 * 8 * H
    assert "NOMINAL" in rl.row_floor("fused_moe", 1, device="B200")["limit"]
    with pytest.raises(ValueError):
        rl.row_floor("fused_moe", 1, direction="bwd")


# ------------------------------------------------------------------------- tools/gpu_run.py's plumbing


def _gpu_run():
    from qwen3moe_kernels.tools import gpu_run

    return gpu_run


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


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for its reaper is gone too
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_gpu_run_timeout_kills_the_whole_process_group(tmp_path):
    # a step whose child starts a grandchild that holds the output pipe (pip -> ninja -> nvcc): on the limit
    # both die and the step returns at once with what it printed, not when the grandchild would have ended
    g = _gpu_run()
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
            "time.sleep(120)")
    t = time.monotonic()
    step = g.Runner(budget_s=60).run("group", [sys.executable, "-c", code], 5)
    assert time.monotonic() - t < 30
    assert step["status"] == "timed out" and "started" in step["output_tail"]
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the grandchild outlived its step"


def test_gpu_run_records_partial_pytest_results(tmp_path):
    # pytest killed on its limit writes no JUnit XML: the -v lines it printed still give the results so far
    g = _gpu_run()
    (tmp_path / "test_slow.py").write_text(
        "import time\n"
        "def test_a(): pass\n"
        "def test_b(): assert False\n"
        "def test_c(): time.sleep(120)\n")
    junit = tmp_path / "j.xml"
    r = g.Runner(budget_s=120)
    step = r.run("pytest", [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path),
                            f"--junitxml={junit}"], 10)
    assert step["status"] == "timed out" and g.junit_summary(junit) == {}
    s = g.pytest_progress(r.outputs["pytest"])
    assert (s["tests"], s["failures"], s["partial"]) == (2, 1, True)
    assert [n.split("/")[-1] for n in s["failed"]] == ["test_slow.py::test_b"]
    text = ("tests/test_x.py::test_a PASSED                  [ 25%]\n"
            "tests/test_x.py::test_b[1-a b] FAILED            [ 50%]\n"
            "tests/test_x.py::test_c SKIPPED (no GPU)         [ 75%]\n"
            "tests/test_x.py::test_d PASSED                  [100%]\n"
            "tests/test_x.py::test_d ERROR                   [100%]\n"
            "FAILED tests/test_x.py::test_b[1-a b] - assert False\n")
    s = g.pytest_progress(text)
    assert (s["tests"], s["failures"], s["errors"], s["skipped"]) == (4, 1, 1, 1)
    assert s["failed"] == ["tests/test_x.py::test_b[1-a b]", "tests/test_x.py::test_d"]


def test_gpu_run_checks_this_gpus_arch_and_skips_the_cpu_only_tests(tmp_path):
    g = _gpu_run()
    assert g.cuda_arch("9.0") == 90 and g.cuda_arch("10.0") == 100 and g.cuda_arch(None) is None
    cmd = g.compile_check_cmd(90)
    assert cmd[cmd.index("--arch") + 1] == "90" and cmd.count("--arch") == 1
    cmd = g.pytest_cmd(tmp_path / "j.xml", ["-k", "cuda"])
    for nodeid in g.CPU_ONLY_TESTS:
        path, name = nodeid.split("::")
        assert f"--deselect={nodeid}" in cmd and path == "tests/test_compile_check.py"
        assert callable(globals().get(name)), f"{name} is not a test here any more"
    assert "-v" in cmd and cmd[-2:] == ["-k", "cuda"]


def test_tools_run_as_modules_and_the_package_never_imports_them():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    g = _gpu_run()
    assert g.ROOT == root and cc.DEFAULT_JSON == root / "benchmarks" / "results" / "compile_check.json"
    assert cc.PACKAGE_DIR == root / "qwen3moe_kernels"
    assert g.compile_check_cmd(90)[1:3] == ["-m", "qwen3moe_kernels.tools.compile_check"]
    code = "import sys, qwen3moe_kernels; print([m for m in sys.modules if m.startswith('qwen3moe_kernels.tools')])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
    for tool in ("gpu_run", "tune_grouped_swiglu", "compile_check"):
        p = subprocess.run([sys.executable, "-m", f"qwen3moe_kernels.tools.{tool}", "--help"], env=cc.clean_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (tool, p.stdout[-1000:] + p.stderr[-2000:])


def test_gpu_run_warns_on_other_versions():
    g = _gpu_run()
    assert g.version_warnings({"python": "3.11.7", "torch": "2.14.1+cu130", "triton": "3.8.0"}) == []
    w = g.version_warnings({"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0"})  # the H200's image
    assert [x.split()[0] for x in w] == ["python", "torch", "triton"]
    assert "3.6.0" in w[2] and "3.8" in w[2]


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
    sig, consts = spec.jit_signature()
    src = ASTSource(fn, sig, consts, spec.divisibility_attrs(list(fn.arg_names)))
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


def test_int_arguments_are_typed_as_the_jit_types_them():
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "stride": "i64", "BLOCK": "constexpr"}
    spec = lambda v: CompileSpec("_row_copy", _row_copy, sig, {"BLOCK": 1024}, "s", ints={"stride": v})  # noqa: E731
    names = ["x_ptr", "y_ptr", "stride", "BLOCK"]
    assert spec(2048).jit_signature() == ({**sig, "stride": "i32"}, {"BLOCK": 1024})  # i64 written, i32 launched
    assert spec(2**31).jit_signature()[0]["stride"] == "i64"
    assert spec(1).jit_signature() == ({**sig, "stride": "constexpr"}, {"BLOCK": 1024, "stride": 1})
    assert (2,) not in spec(1).divisibility_attrs(names)  # a constexpr takes no divisibility hint
    assert (2,) in spec(0).divisibility_attrs(names)  # 0 is a multiple of 16
    assert cc.compile_spec(spec(1), 90).ok  # the variant with stride folded to 1 compiles


def _triton_specialize():
    """Triton's own launch-time specializer, as the JIT calls it for an argument: value -> (type, key)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl (the tests follow Triton 3.8)")
    return lambda value: native_specialize_impl(CUDABackend, value, False, True, True)


def test_int_specialization_matches_triton():
    """kernels/spec.py's rule against Triton's own specializer (the one the JIT calls at launch)."""
    from qwen3moe_kernels.kernels.spec import jit_int_specialization

    specialize = _triton_specialize()
    for v in (0, 1, 2, 15, 16, 17, 2048, 4096 * 128, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**63 - 16, 2**63,
              -1, -16, -(2**31), -(2**31) - 16, True, False):
        ty, key = specialize(v)
        ours = jit_int_specialization(v)
        assert (ours[0], ours[1] if ty == "constexpr" else None) == (ty, key if ty == "constexpr" else None), v
        if ty != "constexpr":
            assert ours[2] == (key == "D"), v


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` records the launch instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((args, kw))


def _python_fn(fn):
    while hasattr(fn, "fn"):  # JITFunction / InterpretedFunction -> the Python function
        fn = fn.fn
    return fn


def _variant_of_launch(spec, args, kw) -> dict:
    """What Triton's JIT compiles for this launch: argument -> (type, constexpr value, divisible by 16), and the
    options; args classified by Triton's own specializer."""
    specialize = _triton_specialize()
    names = list(inspect.signature(_python_fn(spec.fn)).parameters)
    values = {**dict(zip(names, args)), **{k: v for k, v in kw.items() if k in names}}
    out = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}  # Triton's defaults
    for name in names:
        if spec.signature[name] == "constexpr":
            out[name] = ("constexpr", values[name], False)
        else:
            ty, key = specialize(values[name])
            out[name] = (ty, key, False) if ty == "constexpr" else (ty, None, key == "D")
    return out


def _variant_of_spec(spec) -> dict:
    sig, consts = spec.jit_signature()
    names = list(inspect.signature(_python_fn(spec.fn)).parameters)
    attrs = spec.divisibility_attrs(names)
    out = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    for i, name in enumerate(names):
        out[name] = ("constexpr", consts[name], False) if sig[name] == "constexpr" else (sig[name], None,
                                                                                        (i,) in attrs)
    return out


def _frozen(variant: dict) -> tuple:
    return tuple(sorted(variant.items()))


def _launch_gaps(module, kernels: list[str], launch) -> tuple[int, dict, set]:
    """Run ``launch()`` with ``module``'s kernels replaced by recorders, and compare each recorded launch with
    the nearest of the module's compile specs for that kernel. Returns (launches, {(kernel, argument): (launch's
    variant, spec's) for every argument that differs}, the (kernel, label) of every spec some launch is exactly);
    an exact match differs in nothing."""
    specs = module.compile_specs()
    recorders = {k: _Recorder() for k in kernels}
    mp = pytest.MonkeyPatch()
    try:
        for k, rec in recorders.items():
            mp.setattr(module, k, rec)
        launch()
    finally:
        mp.undo()
    n, gaps, used = 0, {}, set()
    for k, rec in recorders.items():
        mine = [sp for sp in specs if sp.kernel == k]
        assert mine, f"no compile spec for {k}"
        variants = [_variant_of_spec(sp) for sp in mine]
        for args, kw in rec.launches:
            got = _variant_of_launch(mine[0], args, kw)
            i = min(range(len(mine)), key=lambda j: sum(got[a] != variants[j][a] for a in got))
            diff = {(k, a): (got[a], variants[i][a]) for a in got if got[a] != variants[i][a]}
            gaps.update(diff)
            if not diff:
                used.add((k, mine[i].label))
            n += 1
    return n, gaps, used


def _check_specs_are_the_launches(module, kernels: list[str], gaps: dict, used: set):
    """Strict both ways: every launch is exactly some spec's variant, every spec is some launch's (no spec for a
    shape nothing launches), and no two specs are the same variant (each is compiled twice in CI)."""
    assert not gaps, f"launches that are no compile spec's variant, (kernel, argument): (launch, spec): {gaps}"
    specs = [sp for sp in module.compile_specs() if sp.kernel in kernels]
    labels = [(sp.kernel, sp.label) for sp in specs]
    assert len(set(labels)) == len(labels), "two specs of one kernel with the same label (compile-check's row key)"
    seen = {}
    for sp in specs:
        v = seen.setdefault((sp.kernel, _frozen(_variant_of_spec(sp))), sp.label)
        assert v == sp.label, f"{sp.kernel}: specs [{v}] and [{sp.label}] compile to the same variant"
    unused = [(sp.kernel, sp.label) for sp in specs if (sp.kernel, sp.label) not in used]
    assert not unused, f"compile specs that no launch here compiles (unrealistic, or launch them here): {unused}"


def test_rms_norm_launches_are_compile_specs():
    import torch

    from qwen3moe_kernels.kernels import rms_norm

    def launch():
        for h in (2048, 4096):
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                e = lambda *shape, dt=dt: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
                for rows in (1, 8, 4096):  # decode T = 1 and 8, prefill 4096
                    for res in (False, True):
                        x = e(rows, h)
                        rms_norm.rms_norm_fwd(x, e(rows, h) if res else None, e(h), 1e-6, e(rows, h),
                                              e(rows, h) if res else None)
                    rms_norm.rms_norm_bwd(e(rows, h), e(rows, h), e(h), 1e-6, e(rows, h), e(h))

    kernels = ["rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "col_sum_kernel"]
    n, gaps, used = _launch_gaps(rms_norm, kernels, launch)
    assert n == 2 * 3 * 3 * (2 + 2)
    _check_specs_are_the_launches(rms_norm, kernels, gaps, used)


def test_rope_launches_are_compile_specs():
    import torch

    from qwen3moe_kernels.kernels import rms_norm, rope

    def launch():
        D = rope._D
        for _model, _hidden, hq, hk in rope._MODELS:
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                e = lambda *shape, dt=dt: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
                for B, S in ((1, 1), (8, 1), (1, 4096)):  # decode T = 1 and 8 (S = 1), prefill
                    q, k, gq, gk = e(B, S, hq, D), e(B, S, hk, D), e(B, S, hq, D), e(B, S, hk, D)
                    pos = torch.empty(B, S, dtype=torch.int64, device="meta")
                    inv = torch.empty(D // 2, dtype=torch.float32, device="meta")
                    for w in ((None, None), (e(D), e(D))):
                        # cos/sin [B, S, D] and position_ids [B, S], as transformers passes them
                        for table in ((e(B, S, D), e(B, S, D), None, None), (None, None, pos, inv)):
                            rope.qk_norm_rope_fwd(q, k, *w, *table, 1e-6, gq, gk)
                            rope.qk_norm_rope_bwd(gq, gk, q, k, *w, *table, 1e-6, gq, gk, e(D), e(D))

    kernels = ["qk_norm_rope_fwd_kernel", "qk_norm_rope_bwd_kernel"]
    inner = {}

    def launch_and_record_rope():
        inner["rope"] = _launch_gaps(rope, kernels, launch)

    # the backward's weight-gradient sums (rms_norm's col_sum_kernel, specced there) are recorded too
    n_sums, sum_gaps, _ = _launch_gaps(rms_norm, ["col_sum_kernel"], launch_and_record_rope)
    n, gaps, used = inner["rope"]
    assert n == 2 * 3 * 3 * 2 * 2 * 2
    assert n_sums == 2 * 3 * 3 * 2 * 2  # with the norm: dqw and dkw
    assert not sum_gaps, f"rope's col_sum launches that are no compile spec's variant: {sum_gaps}"
    _check_specs_are_the_launches(rope, kernels, gaps, used)
