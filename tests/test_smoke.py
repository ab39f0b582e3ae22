"""`import qwen3moe_kernels` loads the extension and registers every op, without importing triton."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import qwen3moe_kernels

ROOT = Path(__file__).resolve().parent.parent
# the schemas csrc/ops.cpp defines; the experts' schemas (defined there too, over several lines) named again, so a
# regex that missed them would not shrink the check
CPP_OPS = re.findall(r'm\.def\(\s*"([a-z_]+)(?:\.out)?\(', (ROOT / "csrc" / "ops.cpp").read_text())
PY_OPS = ["grouped_swiglu", "grouped_swiglu_backward", "grouped_swiglu_gate_up", "grouped_swiglu_down",
          "grouped_swiglu_down_backward", "grouped_swiglu_gate_up_backward"]


def test_import_registers_every_op_without_triton():
    assert len(CPP_OPS) >= 11, CPP_OPS
    code = ("import json, sys, torch, qwen3moe_kernels as qk\n"
            f"names = {sorted(set(CPP_OPS + PY_OPS))!r}\n"
            "missing = [n for n in names if not torch._C._jit_get_schemas_for_operator('qwen3moe::' + n)]\n"
            "print(json.dumps({'missing': missing, 'triton': 'triton' in sys.modules,\n"
            "                  'ext': qk._ext.AVAILABLE, 'version': qk.__version__}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"missing": [], "triton": False, "ext": True, "version": qwen3moe_kernels.__version__}, got


def test_public_functions_are_the_ops():
    for name in qwen3moe_kernels.ops.__all__:
        assert callable(getattr(qwen3moe_kernels.ops, name)), name
    assert qwen3moe_kernels.ops.fused_moe.__module__ == "qwen3moe_kernels.ops.fused_moe"


def test_cpu_compute_dtype_follows_native_bf16(monkeypatch):
    # One rule for CPU paths and benchmarks: bf16 stays bf16 only where the CPU has native bf16 dot products.
    from qwen3moe_kernels import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert cpu.cpu_compute_dtype(torch.bfloat16) == torch.float32
    assert cpu.cpu_compute_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert cpu.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16
