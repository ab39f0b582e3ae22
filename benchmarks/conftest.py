"""Shared fixtures for the pytest-benchmark suites in benchmarks/ (pytest benchmarks/bench_X.py --benchmark-enable).

The device comes from ``QWEN3MOE_BENCH_DEVICE`` (default: cuda when available), token counts from
``QWEN3MOE_BENCH_TOKENS`` (comma-separated; default: the per-device decode and prefill counts of
``qwen3moe_kernels.bench``); the suites import these selectors from ``qwen3moe_kernels.bench``, where they live
so that no other conftest.py can shadow them. Machine information (CPU model and capability, GPU, versions,
commit) is added to pytest-benchmark's JSON (``--benchmark-json``) under ``machine_info["qwen3moe"]``.
"""

import pytest
import torch

from qwen3moe_kernels import bench
from qwen3moe_kernels.bench import bench_device, bench_dtype, bench_tokens  # noqa: F401  (the suites' selection)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qwen3moe"] = bench.machine_info(bench_device())


@pytest.fixture
def device() -> str:
    return bench_device()
