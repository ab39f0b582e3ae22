"""What this machine's CPU can do, read once: lscpu's model and flags, and whether bf16 GEMMs are native.

bf16 matrix products are fast only where the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16); an
AVX2-only CPU emulates them at under 1 GFLOP/s. ``torch.backends.cpu.get_cpu_capability()`` says "AVX512" for any
AVX-512 CPU, with or without BF16, so the flags decide. The CPU paths (:func:`cpu_compute_dtype`) and the
benchmarks (their dtype, and the machine record beside every number) use this one rule.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    flags = _lscpu().get("Flags", "")
    if not flags:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = line.partition(":")[2]
                    break
        except OSError:
            pass
    return frozenset(flags.split())


def cpu_flags() -> set[str]:
    return set(_cpu_flags())


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True where the CPU computes bf16 dot products natively (fast bf16 GEMMs)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU matrix product of ``dtype`` operands runs in: bf16 stays bf16 where the CPU has native bf16
    dot products (fast bf16 GEMMs), else fp32."""
    if dtype == torch.bfloat16 and not native_bf16():
        return torch.float32
    return dtype
