"""Shared fixtures for the pytest-benchmark suites in benchmarks/ (run: pytest benchmarks/bench_X.py --benchmark-enable).

The device comes from ``QWEN3MOE_BENCH_DEVICE`` (default: cuda when available), token counts from
``QWEN3MOE_BENCH_TOKENS`` (comma-separated; default: the per-device decode and prefill counts of
``qwen3moe_kernels.bench``). Machine information (CPU model and capability, GPU, versions, commit) is added to
pytest-benchmark's JSON (``--benchmark-json``) under ``machine_info["qwen3moe"]``.
"""

import os

import pytest
import torch

from qwen3moe_kernels import bench


def bench_device() -> str:
    return os.environ.get("QWEN3MOE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_tokens() -> list[int]:
    env = os.environ.get("QWEN3MOE_BENCH_TOKENS")
    if env:
        return [int(t) for t in env.split(",")]
    return bench.DEFAULT_TOKENS.get(torch.device(bench_device()).type, bench.DEFAULT_TOKENS["cuda"])


def bench_dtype() -> torch.dtype:
    env = os.environ.get("QWEN3MOE_BENCH_DTYPE")
    if env:
        return bench.DTYPES[env]
    return bench.cpu_bench_dtype()[0] if bench_device() == "cpu" else torch.bfloat16


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qwen3moe"] = bench.machine_info(bench_device())


@pytest.fixture
def device() -> str:
    return bench_device()
