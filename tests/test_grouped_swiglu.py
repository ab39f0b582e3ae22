"""Triton grouped-GEMM SwiGLU kernels under the interpreter (a subprocess, so TRITON_INTERPRET=1 is set before
triton is imported), and their compile specs."""

import os
import subprocess
import sys
from pathlib import Path

from qwen3moe_kernels.kernels import grouped_swiglu


def test_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("_grouped_swiglu_interp.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_compile_specs_cover_kernels_and_dtypes():
    specs = grouped_swiglu.compile_specs()
    kernels = {s.kernel for s in specs}
    assert kernels == {"grouped_swiglu_gate_up_kernel", "grouped_swiglu_down_kernel"}
    assert {s.signature["x_ptr"] for s in specs if "x_ptr" in s.signature} == {"*bf16", "*fp16", "*fp32"}
    assert all(s.gemm for s in specs)
