"""The build and the README's contract: the build record, a torch mismatch, pip's build isolation, CI = README.

Tests marked ``build`` depend on how the extension was built; ``.ci/build_variants`` reruns them for every build
setup.py documents (default archs, one arch, CPU only).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3moe_kernels import _ext
from qwen3moe_kernels.tools import compile_check as cc

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.build
def test_build_record_matches_the_extension():
    rec = _ext.BUILD
    assert rec is not None, f"no {_ext.BUILD_RECORD.name} beside _C: build with pip install --no-build-isolation -e ."
    assert rec["torch"] == torch.__version__
    assert _ext.AVAILABLE, _ext.IMPORT_ERROR
    if rec["no_cuda_reason"] is None:
        assert _ext.WITH_CUDA and cc.build_cuda_archs(rec), rec
    else:
        assert not _ext.WITH_CUDA and rec["cuda_archs"] is None, rec
        # the gate CI had as an environment variable: with a CUDA torch and nvcc on the machine, a build without
        # CUDA kernels must have been asked for
        if torch.version.cuda and cc.nvcc_path():
            assert rec["no_cuda_reason"] == "QWEN3MOE_SKIP_CUDA_BUILD=1", (
                f"torch is a CUDA build and {cc.nvcc_path()} exists, but the extension has no CUDA kernels: {rec}")


@pytest.mark.build
def test_device_code_holds_exactly_the_archs_the_build_asked_for():
    rows, notes = cc.cuda_report()
    wanted = cc.build_cuda_archs(_ext.BUILD)
    if not wanted:
        assert rows == [] and notes, (rows, notes)  # a CPU-only build: a note, no rows
        return
    assert {r.arch for r in rows} == set(wanted), [r.problems for r in rows if r.problems]
    rows, _ = cc.cuda_report(record=dict(_ext.BUILD, cuda_archs="7.5;" + _ext.BUILD["cuda_archs"]))
    missing = [r for r in rows if not r.ok]
    assert len(missing) == 1 and "sm_75" in missing[0].problems[0]


def test_build_cuda_archs_names_them_as_cuobjdump_does():
    assert cc.build_cuda_archs({"cuda_archs": "8.0;9.0a;10.0a"}) == ["sm_100a", "sm_80", "sm_90a"]
    assert cc.build_cuda_archs({"cuda_archs": "9.0 8.0+PTX"}) == ["sm_80", "sm_90"]
    assert cc.build_cuda_archs({"cuda_archs": None, "no_cuda_reason": "QWEN3MOE_SKIP_CUDA_BUILD=1"}) == []
    assert cc.build_cuda_archs(None) is None


def test_committed_compile_table_is_made_from_the_default_build():
    # the README's build (setup.py's default arch list) is the one the committed table describes in full
    default = re.search(r'^DEFAULT_ARCHS = "([^"]+)"', (ROOT / "setup.py").read_text(), flags=re.M).group(1)
    committed = json.loads(cc.DEFAULT_JSON.read_text())
    assert committed["cuda_archs"] == cc.build_cuda_archs({"cuda_archs": default})
    assert {r["arch"] for r in committed["cuda"]} == set(committed["cuda_archs"])


def test_staleness_compares_the_cuda_archs_both_builds_hold():
    def row(arch, regs=32):
        return {"kernel": "k", "config": "c", "arch": arch, "registers": regs}

    committed = {"cuda_archs": ["sm_100a", "sm_80", "sm_90a"], "cuda": [row("sm_80"), row("sm_90a"), row("sm_100a")]}
    default = dict(committed)
    one_arch = {"cuda_archs": ["sm_90a"], "cuda": [row("sm_90a")]}
    cpu_only = {"cuda_archs": [], "cuda": []}
    more = {"cuda_archs": committed["cuda_archs"] + ["sm_120a"], "cuda": committed["cuda"] + [row("sm_120a")]}
    for build in (default, one_arch, cpu_only, more):
        assert cc.table_diff(committed, build, ["cuda"]) == [], build["cuda_archs"]
    changed = {"cuda_archs": ["sm_90a"], "cuda": [row("sm_90a", regs=40)]}
    assert cc.table_diff(committed, changed, ["cuda"]) == ["cuda: ('k', 'c', 'sm_90a'): registers 32 -> 40"]
    gone = {"cuda_archs": committed["cuda_archs"], "cuda": [row("sm_80"), row("sm_90a")]}
    assert cc.table_diff(committed, gone, ["cuda"]) == ["cuda: removed ('k', 'c', 'sm_100a')"]


def test_a_torch_mismatch_is_one_clear_error():
    with pytest.raises(_ext.BuildMismatchError) as err:
        _ext.check_build({"torch": "2.9.0+cpu"}, "2.14.1+cu130")
    msg = str(err.value)
    assert "2.9.0+cpu" in msg and "2.14.1+cu130" in msg and "pip install --no-build-isolation -e ." in msg
    _ext.check_build({"torch": "2.14.1+cu130"}, "2.14.1+cu130")
    _ext.check_build(None, "2.14.1+cu130")  # no record (never built): nothing to compare


@pytest.mark.build
def test_importing_against_another_torch_names_both_versions():
    # the running torch faked to another version: the import stops before loading _C, with the fix
    code = "import torch; torch.__version__ = '0.0.1+fake'; import qwen3moe_kernels"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "BuildMismatchError" in last and "0.0.1+fake" in last and torch.__version__ in last, p.stderr[-2000:]
    assert "pip install --no-build-isolation -e ." in last


def test_setup_py_without_torch_stops_at_once_saying_what_to_run():
    # what pip's build isolation gives setup.py: a Python without the installed torch
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-build-isolation -e ." in lines[0], p.stderr


def _readme_block() -> str:
    p = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme.py")], capture_output=True, text=True, check=True)
    return p.stdout


def test_ci_runs_the_readme_block_as_written():
    block = _readme_block()
    commands = [c for c in re.split(r"\n(?=[^\s#])", re.sub(r"^#.*\n", "", block, flags=re.M)) if c.strip()]
    assert len(commands) == 2, commands
    install, tests = commands
    assert "pip install --no-build-isolation -e" in install and "qwen3moe-kernels check" in install
    assert "qwen3moe-kernels bench" in install
    assert tests.strip() == "python -m pytest -q tests"
    # no environment the README does not show: none set in the block, none exported by CI
    assert not re.search(r"(^|\s)export\s|(^|[\s&;(])[A-Z_]+=\S", block), block
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'block=$(python3 .ci/readme.py)' in ci and 'bash -euo pipefail -c "$block"' in ci
    assert not re.search(r"^\s*export\s", ci, flags=re.M)
    assert "pytest" not in ci.replace(".ci/readme.py", "") and "pip install" not in ci


def test_the_readme_says_how_long_the_two_commands_take():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"2-core machine: command 1 takes about \d+ minutes?.*the tests about \d+ minutes?", readme,
                     flags=re.S), "the README's timing note is missing or reworded: measure both commands again"
