"""Ahead-of-time compile check of every GPU kernel the library ships, on a machine without a GPU.

Compiles every Triton kernel x launch config x dtype that a ``qwen3moe_kernels/kernels/`` module lists in
``compile_specs()`` for sm_90 and sm_100 (``triton.compile``, no driver), reads registers, spills and shared memory
from the cubin (``cuobjdump``) and tensor-core instructions from the PTX, estimates occupancy, and reports the
CUDA kernels in ``qwen3moe_kernels/_C*.so`` the same way. ``main`` prints the table, writes
``benchmarks/results/compile_check.json`` and returns 1 on any failure; ``qwen3moe-kernels compile-check`` and
``python -m qwen3moe_kernels.tools.compile_check`` run it. The rules and what they prove: docs/gpu_verification.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNELS_PACKAGE = "qwen3moe_kernels.kernels"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # qwen3moe_kernels/ (this file is in tools/)
DEFAULT_JSON = PACKAGE_DIR.parent / "benchmarks" / "results" / "compile_check.json"
ARCHS = (90, 100)
NATIVE_TC = {90: "wgmma", 100: "tcgen05"}  # each arch's own tensor-core instruction family
REQUIRE_CUDA_ENV = "QWEN3MOE_REQUIRE_CUDA_BUILD"  # "1": an extension without CUDA device code is a failure


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of one compute capability (CUDA C Programming Guide, compute capability table)."""

    name: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64  # 2048 threads
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # the opt-in maximum one block may use (cudaFuncAttributeMaxDynamicSharedMemorySize)
    smem_reserved_per_block: int = 1024  # the driver keeps 1 KB of each block's shared memory for itself
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)


# H100/H200 (sm_90) and B200 (sm_100) have the same per-SM limits. A block may use 227 KB of shared memory on
# both; 228 KB is the per-SM total (the "228 KB on B200"), of which 1 KB per block is reserved.
LIMITS = {90: SMLimits("sm_90 (H100/H200)"), 100: SMLimits("sm_100 (B200)")}
# A100 (sm_80, in setup.py's default arch list): reported for the CUDA kernels, not a compile-check target.
OTHER_LIMITS = {80: SMLimits("sm_80 (A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024)}

# Known findings accepted for now, each with its reason, printed as WAIVED (never silently). Keys: (kernel name as
# in the table, arch). A waiver that no longer matches a problem is reported as a note so it gets removed.
WAIVERS: dict[tuple[str, str], str] = {
    # (empty: the router_topk<Half|BFloat16, 8, 2> sm_100a 8 B stack frame was fixed in csrc/router_topk.cu)
}

# Threads per block each CUDA kernel of csrc/*.cu is launched with (the cubin does not record it), by kernel name
# without template arguments. Occupancy is estimated at these; a kernel missing here fails, so the table stays
# complete (tests/test_compile_check.py checks it against the __global__ kernels and __launch_bounds__ in csrc).
CUDA_BLOCK_THREADS = {
    "router_topk_kernel": 128,  # router_topk.cu: kWarpsPerBlock * 32
    "sort_hist_kernel": 128,  # moe_permute.cu: kSortWarps * 32
    "sort_scan_kernel": 512,  # moe_permute.cu: kMaxE
    "sort_scatter_kernel": 128,  # moe_permute.cu: kSortWarps * 32
    "align_fill_kernel": 256,  # moe_permute.cu: threads = 256
    "permute_kernel": 128,  # moe_permute.cu
    "unpermute_kernel": 256,  # moe_permute.cu
}

TMEM_COLUMNS = 512  # sm_100 tensor memory: 128 lanes x 512 columns of 32 bits per SM

TC_PATTERNS = {
    "wgmma": re.compile(r"\bwgmma\.mma_async\b"),
    "tcgen05": re.compile(r"\btcgen05\.mma\b"),
    "mma.sync": re.compile(r"\bmma\.sync\b"),
}


# ------------------------------------------------------------------------------------------------ parsing


def parse_resource_usage(text: str) -> list[dict]:
    """Parse ``cuobjdump --dump-resource-usage`` output into one dict per (arch, function).

    Each dict: arch ("sm_90a"; None for a bare cubin, whose arch the caller knows), function (mangled),
    reg, stack, shared, local (bytes), constant0.
    """
    out: list[dict] = []
    arch = None
    func = None
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"arch\s*=\s*(\S+)", s)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function\s+(.+?):\s*$", s)
        if m:
            func = m.group(1)
            continue
        if func is not None and s.startswith("REG:"):
            vals = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", s))
            out.append({
                "arch": arch,
                "function": func,
                "reg": int(vals.get("REG", 0)),
                "stack": int(vals.get("STACK", 0)),
                "shared": int(vals.get("SHARED", 0)),
                "local": int(vals.get("LOCAL", 0)),
                "constant0": int(vals.get("CONSTANT[0]", 0)),
            })
            func = None
    return out


def count_tensor_core_ops(ptx: str) -> dict[str, int]:
    """Tensor-core instructions in PTX, by family."""
    return {k: len(p.findall(ptx)) for k, p in TC_PATTERNS.items()}


def estimate_occupancy(regs: int, smem_bytes: int, num_warps: int, limits: SMLimits) -> dict:
    """Resident blocks and warps per SM, and occupancy (warps / max warps), from what limits them.

    Registers: per warp, regs x 32 rounded up to the 256-register allocation unit. Shared memory: each block
    takes its own plus the 1 KB the driver reserves. ``limiter`` names the tightest resource.
    """
    regs = max(int(regs), 1)
    per_warp = math.ceil(regs * 32 / limits.reg_alloc_unit) * limits.reg_alloc_unit
    warps_by_regs = limits.regs_per_sm // per_warp
    by = {
        "warps": limits.max_warps_per_sm // num_warps,
        "registers": warps_by_regs // num_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    if smem_bytes > 0:
        by["shared"] = limits.smem_per_sm // (smem_bytes + limits.smem_reserved_per_block)
    if smem_bytes > limits.smem_per_block or regs > limits.max_regs_per_thread:
        by["shared" if smem_bytes > limits.smem_per_block else "registers"] = 0
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))  # a tie at full occupancy reads as "warps"
    warps = blocks * num_warps
    return {"blocks_per_sm": blocks, "warps_per_sm": warps, "occupancy": warps / limits.max_warps_per_sm,
            "limiter": limiter}


# ---------------------------------------------------------------------------------------------- tools


def triton_bin(tool: str) -> str | None:
    """Path of a tool Triton ships in triton/backends/nvidia/bin (cuobjdump, ptxas), else one on PATH."""
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(tool)


def cuobjdump_resources(path: str) -> tuple[list[dict], str]:
    """(parsed resource usage, raw text or error) of a cubin or a shared library with embedded device code."""
    tool = triton_bin("cuobjdump")
    if tool is None:
        return [], "cuobjdump not found (neither in triton/backends/nvidia/bin nor on PATH)"
    r = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    text = r.stdout + r.stderr
    return parse_resource_usage(r.stdout), text


def demangle(names: list[str]) -> dict[str, str]:
    cf = shutil.which("c++filt")
    if cf is None or not names:
        return {n: n for n in names}
    r = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_cuda_name(demangled: str) -> str:
    """``void qwen3moe::(anonymous namespace)::permute_kernel<float, 4>(...)`` -> ``permute_kernel<float, 4>``."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s.startswith("(anonymous", i):
            cut = i
            break
    s = s[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(s):  # the last '::' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and s.startswith("::", i):
            start = i + 2
    return s[start:]


# ----------------------------------------------------------------------------------------- discovery


def _is_jit(obj) -> bool:
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(obj, JITFunction)


def unwrap_jit(fn):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers (each keeps it in ``.fn``)."""
    seen = 0
    while not _is_jit(fn) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    return fn


def kernel_modules() -> list[str]:
    pkg = importlib.import_module(KERNELS_PACKAGE)
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg and m.name not in ("spec",)]
    return [f"{KERNELS_PACKAGE}.{n}" for n in sorted(names) if not n.startswith("_")]


def launched_jit_kernels(mod) -> dict[str, object]:
    """@triton.jit functions defined in ``mod`` that no other @triton.jit function of ``mod`` calls by name.

    Helpers called from a kernel are inlined into it and compiled with it; the rest are the launched kernels.
    """
    jits = {}
    for name, obj in vars(mod).items():
        fn = unwrap_jit(obj)
        if _is_jit(fn) and getattr(fn.fn, "__module__", None) == mod.__name__:
            jits[fn.__name__] = fn
    called = set()
    for name, fn in jits.items():
        src = getattr(fn, "src", "") or ""
        for other in jits:
            if other != name and re.search(rf"(?<![\w.]){re.escape(other)}\s*\(", src):
                called.add(other)
    return {n: f for n, f in jits.items() if n not in called}


@dataclass
class Discovery:
    specs: list = field(default_factory=list)  # CompileSpec
    errors: list = field(default_factory=list)  # (module, message): import errors, a missing compile_specs
    uncovered: list = field(default_factory=list)  # (module, kernel): launched @triton.jit without a spec
    modules: list = field(default_factory=list)


def discover(modules: list[str] | None = None) -> Discovery:
    """Import each kernels module, collect its compile_specs(), and list launched kernels that have none."""
    d = Discovery()
    for mname in kernel_modules() if modules is None else modules:
        d.modules.append(mname)
        try:
            mod = importlib.import_module(mname)
        except Exception as exc:  # a module that does not import cannot ship anything
            d.errors.append((mname, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        kernels = launched_jit_kernels(mod)
        if not hasattr(mod, "compile_specs"):
            if kernels:
                d.errors.append((mname, "defines @triton.jit kernels but no compile_specs()"))
                d.uncovered += [(mname, k) for k in sorted(kernels)]
            continue
        try:
            specs = list(mod.compile_specs())
        except Exception as exc:
            d.errors.append((mname, f"compile_specs() raised {type(exc).__name__}: {exc}"))
            continue
        for sp in specs:
            fn = unwrap_jit(sp.fn)
            if not _is_jit(fn):
                d.errors.append((mname, f"spec {sp.kernel} [{sp.label}]: fn is {type(sp.fn).__name__}, not a "
                                        f"@triton.jit function (imported with TRITON_INTERPRET=1?)"))
                continue
            if set(sp.signature) != set(fn.arg_names):
                d.errors.append((mname, f"spec {sp.kernel} [{sp.label}]: signature {sorted(sp.signature)} does not "
                                        f"name exactly the arguments {fn.arg_names}"))
                continue
            if not set(sp.constexprs) <= {k for k, v in sp.signature.items() if v == "constexpr"}:
                d.errors.append((mname, f"spec {sp.kernel} [{sp.label}]: constexprs {sorted(sp.constexprs)} must "
                                        f"be typed 'constexpr' in the signature"))
                continue
            d.specs.append(sp)
        covered = {unwrap_jit(sp.fn).__name__ for sp in specs if _is_jit(unwrap_jit(sp.fn))}
        d.uncovered += [(mname, k) for k in sorted(kernels) if k not in covered]
    return d


# ------------------------------------------------------------------------------------------ compiling


@dataclass
class Row:
    kernel: str
    config: str
    arch: str
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # stack frame + local memory per thread
    shared_bytes: int | None = None  # dynamic (Triton's) + static, per block
    tmem_cols: int | None = None
    occupancy: float | None = None
    limiter: str | None = None
    tensor_cores: dict = field(default_factory=dict)
    gemm: bool = False
    tc_rule: str | None = None  # GEMMs: "wgmma" / "tcgen05" (the arch's own family required) or "narrow tile"
    ok: bool = True
    problems: list = field(default_factory=list)
    source: str = "triton"  # "triton" or "cuda"
    waived: str | None = None  # a known problem accepted in WAIVERS, with its reason
    compile_s: float | None = None  # not written to JSON (noise in a diff)


def check_row(row: Row, limits: SMLimits) -> Row:
    """Apply the pass/fail rules to a filled-in row."""
    if row.spill_bytes:
        row.problems.append(f"{row.spill_bytes} B stack/local memory per thread (register spill)")
    if row.shared_bytes is not None and row.shared_bytes > limits.smem_per_block:
        row.problems.append(
            f"shared memory {row.shared_bytes / 1024:.1f} KB > {limits.smem_per_block // 1024} KB per-block limit")
    if row.tmem_cols and row.tmem_cols > TMEM_COLUMNS:
        row.problems.append(f"tensor memory {row.tmem_cols} columns > {TMEM_COLUMNS} per SM (sm_100)")
    if row.gemm and not any(row.tensor_cores.values()):
        row.problems.append("GEMM without tensor-core instructions (no wgmma / tcgen05 / mma.sync in the PTX)")
    elif row.tc_rule in TC_PATTERNS and not row.tensor_cores.get(row.tc_rule):
        found = ", ".join(f"{k} x{v}" for k, v in row.tensor_cores.items() if v)
        row.problems.append(f"GEMM needs {row.arch}'s own tensor-core instructions ({row.tc_rule}: a tile of "
                            f"BLOCK_M >= 64, or native_mma=True) but compiled without them (found {found})")
    waiver = WAIVERS.get((row.kernel, row.arch))
    if waiver and row.problems and all("spill" in p for p in row.problems):
        row.waived = f"{'; '.join(row.problems)} -- waived: {waiver}"
        row.problems = []
    row.ok = not row.problems
    return row


def compile_spec(spec, arch: int) -> Row:
    """Compile one spec for one arch and fill a row (problems listed; never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    limits = LIMITS[arch]
    row = Row(kernel=spec.kernel, config=spec.label, arch=f"sm_{arch}", num_warps=spec.num_warps,
              num_stages=spec.num_stages, gemm=bool(spec.gemm))
    if row.gemm:
        row.tc_rule = NATIVE_TC[arch] if spec.requires_native_mma() else "narrow tile"
    t0 = time.perf_counter()
    try:
        fn = unwrap_jit(spec.fn)
        signature, constexprs = spec.jit_signature()  # the variant the JIT launches (see kernels/spec.py)
        src = ASTSource(fn, signature, constexprs, spec.divisibility_attrs(list(fn.arg_names)))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        row.problems.append(f"compile error: {type(exc).__name__}: {' | '.join(msg[-3:])[:400]}")
        row.ok = False
        return row
    row.compile_s = time.perf_counter() - t0
    md = k.metadata
    dyn_shared = int(getattr(md, "shared", 0) or 0)
    row.tmem_cols = int(getattr(md, "tmem_size", 0) or 0)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res, text = cuobjdump_resources(cubin)
    if not res:
        row.problems.append(f"cuobjdump gave no resource usage: {text.strip()[:200]}")
        row.ok = False
        return row
    r = res[0]
    row.registers = r["reg"]
    row.spill_bytes = r["stack"] + r["local"]
    row.shared_bytes = dyn_shared + r["shared"]
    occ = estimate_occupancy(row.registers, row.shared_bytes, spec.num_warps, limits)
    row.occupancy, row.limiter = round(occ["occupancy"], 4), occ["limiter"]
    row.tensor_cores = count_tensor_core_ops(k.asm["ptx"])
    return check_row(row, limits)


_POOL_SPECS: list = []


def _pool_job(i_arch):
    i, arch = i_arch
    return compile_spec(_POOL_SPECS[i], arch)


def compile_all(specs, archs=ARCHS, jobs: int = 1) -> list[Row]:
    """Compile every spec for every arch, in a forked process pool of ``jobs`` (specs hold functions, which
    do not pickle; a fork inherits them). A fresh Triton cache directory per run, removed afterwards."""
    global _POOL_SPECS
    work = [(i, a) for i in range(len(specs)) for a in archs]
    if not work:
        return []
    old = os.environ.get("TRITON_CACHE_DIR")
    tmp = tempfile.mkdtemp(prefix="qwen3moe_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = tmp
    try:
        try:  # triton >= 3.4 reads its cache dir through knobs
            import triton

            knobs_cache = getattr(getattr(triton, "knobs", None), "cache", None)
            old_knob = getattr(knobs_cache, "dir", None) if knobs_cache is not None else None
            if knobs_cache is not None:
                knobs_cache.dir = tmp
        except Exception:
            knobs_cache = None
        if jobs > 1 and len(work) > 1 and hasattr(os, "fork"):
            import multiprocessing as mp

            _POOL_SPECS = list(specs)
            with mp.get_context("fork").Pool(min(jobs, len(work))) as pool:
                rows = pool.map(_pool_job, work, chunksize=1)
            _POOL_SPECS = []
        else:
            rows = [compile_spec(specs[i], a) for i, a in work]
        if knobs_cache is not None:
            try:
                knobs_cache.dir = old_knob
            except Exception:
                pass
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------ CUDA C++


def extension_library() -> str | None:
    libs = sorted(PACKAGE_DIR.glob("_C*.so")) + sorted(PACKAGE_DIR.glob("_C*.pyd"))
    return str(libs[0]) if libs else None


def cuda_build_required() -> bool:
    """Whether the environment asks for CUDA device code in the extension (``QWEN3MOE_REQUIRE_CUDA_BUILD=1``)."""
    return os.environ.get(REQUIRE_CUDA_ENV, "0") == "1"


def _no_device_code(message: str) -> tuple[list[Row], list[str]]:
    """A missing CUDA build: a note, or a failed row when ``QWEN3MOE_REQUIRE_CUDA_BUILD=1``."""
    if cuda_build_required():
        return [Row(kernel="(extension)", config="CUDA device code", arch="-", source="cuda", ok=False,
                    problems=[f"{message}; {REQUIRE_CUDA_ENV}=1 requires CUDA kernels (build with nvcc "
                              f"and without QWEN3MOE_SKIP_CUDA_BUILD=1)"])], []
    return [], [message]


def cuda_row(r: dict, demangled: str) -> Row:
    """The checked row of one CUDA kernel x arch (``r``: one :func:`parse_resource_usage` entry)."""
    archnum = int(re.sub(r"\D", "", r["arch"] or "0") or 0)
    limits = LIMITS.get(archnum) or OTHER_LIMITS.get(archnum) or LIMITS[90]
    name = short_cuda_name(demangled)
    base = name.split("<")[0]
    row = Row(kernel=name, config=demangled, arch=r["arch"] or "?", registers=r["reg"],
              spill_bytes=r["stack"] + r["local"], shared_bytes=r["shared"], source="cuda")
    threads = CUDA_BLOCK_THREADS.get(base)
    if threads is None:
        row.problems.append(f"no block size for {base} in compile_check.CUDA_BLOCK_THREADS: add the threads per "
                            f"block csrc/ launches it with")
    else:
        row.num_warps = threads // 32
        occ = estimate_occupancy(r["reg"], r["shared"], row.num_warps, limits)
        row.occupancy, row.limiter = round(occ["occupancy"], 4), occ["limiter"]
    return check_row(row, limits)


def build_cuda_archs(record: dict | None) -> list[str] | None:
    """The device-code archs a build asked for, from its record (``_C_build.json``: ``TORCH_CUDA_ARCH_LIST`` as
    cuobjdump names them, "9.0a" -> "sm_90a", "8.0+PTX" -> "sm_80"); [] for a CPU-only build, None without a
    record."""
    if record is None:
        return None
    archs = []
    for entry in re.split(r"[;\s]+", record.get("cuda_archs") or ""):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip(), flags=re.IGNORECASE)
        if m:
            archs.append(f"sm_{m.group(1)}{m.group(2)}{m.group(3).lower()}")
    return sorted(set(archs))


def cuda_report(lib: str | None = None, record: dict | None = None) -> tuple[list[Row], list[str]]:
    """Rows for every CUDA kernel in the extension's device code, and notes.

    A CPU-only build (no device code) gives no rows and a note (a failed row with QWEN3MOE_REQUIRE_CUDA_BUILD=1).
    A library with device code must hold code for every arch its build asked for (``record``, by default the
    installed build's ``_C_build.json``); a missing arch is a failed row. Occupancy is estimated at the kernel's
    block size from ``CUDA_BLOCK_THREADS``.
    """
    lib = lib or extension_library()
    if lib is None or not os.path.exists(lib):
        return _no_device_code(f"no built extension ({lib or 'qwen3moe_kernels/_C*.so'}): build it first to report "
                               f"the CUDA kernels")
    res, text = cuobjdump_resources(lib)
    if not res:
        if "does not contain device code" in text or not text.strip():
            return _no_device_code(f"{os.path.basename(lib)} holds no CUDA device code (a CPU-only build)")
        return _no_device_code(f"cuobjdump on {os.path.basename(lib)}: {text.strip()[:300]}")
    names = demangle(sorted({r["function"] for r in res}))
    rows = [cuda_row(r, names[r["function"]]) for r in res]
    present = {r["arch"] for r in res}
    if record is None:
        from .. import _ext

        record = _ext.BUILD
    for want in build_cuda_archs(record) or []:
        if want not in present:
            rows.append(Row(kernel="(extension)", config=f"device code for {want}", arch=want, source="cuda",
                            ok=False, problems=[f"{os.path.basename(lib)} has no {want} device code although its "
                                                f"build asked for it (has {', '.join(sorted(present))})"]))
    return rows, []


# ------------------------------------------------------------------------------------------- report


def _tc(row: Row) -> str:
    used = [f"{k}x{v}" for k, v in row.tensor_cores.items() if v]
    text = ",".join(used) if used else ("NONE" if row.gemm else "-")
    return f"{text} (narrow tile)" if row.tc_rule == "narrow tile" else text


def format_table(rows: list[Row]) -> str:
    hdr = ["kernel", "config", "arch", "warps", "regs", "spill B", "smem KB", "occupancy", "tensor cores", "status"]
    lines = []
    for r in rows:
        occ = "-" if r.occupancy is None else f"{r.occupancy:.0%} ({r.limiter})"
        lines.append([
            r.kernel[:48], r.config[:60], r.arch, "-" if r.num_warps is None else str(r.num_warps),
            "-" if r.registers is None else str(r.registers), "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}", occ,
            _tc(r) if r.source == "triton" else "-", ("waived" if r.waived else "ok") if r.ok else "FAIL",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) for h, w in zip(hdr, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    for r in rows:
        for p in r.problems:
            out.append(f"FAIL {r.kernel} [{r.config}] {r.arch}: {p}")
        if r.waived:
            out.append(f"WAIVED {r.kernel} {r.arch}: {r.waived}")
    return "\n".join(out)


def _tool_release(path: str | None) -> str | None:
    """``release 13.1`` from a CUDA tool's ``--version``, as "13.1" (None if the tool is missing)."""
    if not path:
        return None
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release ([\d.]+)", r.stdout)
    return m.group(1) if m else None


def nvcc_path() -> str | None:
    """The nvcc a build of the extension uses: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc (setup.py's
    choice), else the one on PATH."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def tool_versions() -> dict:
    """What the table depends on: Triton, its ptxas builds (compile the Triton kernels) and cuobjdump (reads them),
    and the nvcc that builds the CUDA kernels. Recorded in the JSON; the staleness test compares them."""
    try:
        import triton

        v = {"triton": triton.__version__}
    except ImportError:
        v = {"triton": None}
    v["ptxas"] = _tool_release(triton_bin("ptxas"))  # sm_90
    v["ptxas-blackwell"] = _tool_release(triton_bin("ptxas-blackwell"))  # sm_100 (Triton >= 3.5 ships a second one)
    v["cuobjdump"] = _tool_release(triton_bin("cuobjdump"))
    v["nvcc"] = _tool_release(nvcc_path())
    return v


def run(archs=ARCHS, jobs: int = 2, include_cuda: bool = True, modules: list[str] | None = None) -> dict:
    """Discover, compile and check everything; returns the report (also what the JSON holds)."""
    d = discover(modules)
    rows = compile_all(d.specs, archs, jobs)
    rows.sort(key=lambda r: (r.kernel, r.config, r.arch))
    cuda_rows, cuda_notes = cuda_report() if include_cuda else ([], ["CUDA kernels not checked"])
    cuda_rows.sort(key=lambda r: (r.kernel, r.config, r.arch))
    failures = [f"{m}: {e}" for m, e in d.errors]
    failures += [f"{m}: @triton.jit kernel {k} has no CompileSpec in compile_specs()" for m, k in d.uncovered]
    failures += [f"{r.kernel} [{r.config}] {r.arch}: {p}" for r in rows + cuda_rows for p in r.problems]
    notes = list(cuda_notes)
    if include_cuda and cuda_rows:
        used = {(r.kernel, r.arch) for r in cuda_rows if r.waived}
        notes += [f"waiver for {k} {a} no longer needed: remove it from compile_check.WAIVERS"
                  for k, a in WAIVERS if (k, a) not in used]
    if not d.specs:
        notes.insert(0, f"no Triton kernels with compile specs in {KERNELS_PACKAGE} "
                        f"({len(d.modules)} module(s) scanned): nothing to compile")
    return {"triton_rows": rows, "cuda_rows": cuda_rows, "failures": failures, "notes": notes,
            "modules": d.modules, "archs": [f"sm_{a}" for a in archs], "versions": tool_versions(),
            "cuda_archs": sorted({r.arch for r in cuda_rows if r.kernel != "(extension)"})}


def row_json(r: Row) -> dict:
    """A row as the JSON holds it (no timing: the file changes only when a result does)."""
    d = asdict(r)
    d.pop("compile_s", None)
    return d


def to_json(report: dict) -> dict:
    return {
        "what": "AOT compile check of every shipped GPU kernel (qwen3moe-kernels compile-check); no GPU involved",
        "limits": {f"sm_{a}": asdict(l) for a, l in LIMITS.items()},
        "versions": report["versions"],
        "archs": report["archs"],
        "cuda_archs": report["cuda_archs"],
        "modules": report["modules"],
        "ok": not report["failures"],
        "failures": report["failures"],
        "notes": report["notes"],
        "triton": [row_json(r) for r in report["triton_rows"]],
        "cuda": [row_json(r) for r in report["cuda_rows"]],
    }


def table_diff(old: dict, new: dict, parts=("archs", "modules", "triton", "cuda")) -> list[str]:
    """What differs between two compile-check JSONs in ``parts``, one line per item: a row (by kernel, config,
    arch) added, removed or changed (with the changed fields), or a whole non-row part.

    CUDA rows are compared for the archs both builds hold (``cuda_archs``): a build with more archs, fewer (one
    ``TORCH_CUDA_ARCH_LIST`` arch) or none (``QWEN3MOE_SKIP_CUDA_BUILD=1``) is not a difference, a changed kernel
    in an arch both hold is."""
    out = []
    shared = None
    if "cuda_archs" in old and "cuda_archs" in new:
        shared = set(old["cuda_archs"]) & set(new["cuda_archs"])
    for part in parts:
        a, b = old.get(part), new.get(part)
        if not (isinstance(a, list) and isinstance(b, list) and all(isinstance(r, dict) for r in a + b)):
            if a != b:
                out.append(f"{part}: {a!r} -> {b!r}")
            continue
        if part == "cuda" and shared is not None:
            a, b = ([r for r in rows if r.get("arch") in shared] for rows in (a, b))
        key = lambda r: (r.get("kernel"), r.get("config"), r.get("arch"))  # noqa: E731
        ra, rb = {key(r): r for r in a}, {key(r): r for r in b}
        for k in sorted(set(ra) | set(rb), key=str):
            if k not in rb:
                out.append(f"{part}: removed {k}")
            elif k not in ra:
                out.append(f"{part}: added {k}")
            elif ra[k] != rb[k]:
                fields = sorted(f for f in set(ra[k]) | set(rb[k]) if ra[k].get(f) != rb[k].get(f))
                out.append(f"{part}: {k}: " + ", ".join(f"{f} {ra[k].get(f)!r} -> {rb[k].get(f)!r}" for f in fields))
    return out


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def clean_env() -> dict:
    """This process's environment without TRITON_INTERPRET: under it @triton.jit gives interpreter objects that
    cannot be compiled."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if interpreter_on():  # kernels imported here would be interpreter objects: run in a clean process instead
        return subprocess.run([sys.executable, "-m", "qwen3moe_kernels.tools.compile_check", *argv],
                              env=clean_env()).returncode
    p = argparse.ArgumentParser(prog="qwen3moe-kernels compile-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=list(LIMITS),
                   help="compute capability to compile for (repeatable; default 90 and 100)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"where to write the JSON (default {DEFAULT_JSON})")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels of the extension")
    args = p.parse_args(argv)
    archs = tuple(args.arch) if args.arch else ARCHS
    t0 = time.perf_counter()
    report = run(archs, args.jobs, not args.no_cuda)
    if report["triton_rows"]:
        print(f"Triton kernels ({len(report['triton_rows'])} compiles):")
        print(format_table(report["triton_rows"]))
    if report["cuda_rows"]:
        print(f"\nCUDA C++ kernels of the extension ({len(report['cuda_rows'])} kernel x arch):")
        print(format_table(report["cuda_rows"]))
    for n in report["notes"]:
        print(f"note: {n}")
    if not args.no_json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(report), indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    print(f"compile-check: {len(report['failures'])} failure(s) in {time.perf_counter() - t0:.1f} s")
    for f in report["failures"]:
        print(f"  FAIL {f}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
