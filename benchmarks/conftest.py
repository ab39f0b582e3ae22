"""Shared fixtures of the pytest-benchmark suites here (``pytest benchmarks/bench_<stem>.py --benchmark-enable``).

Device, dtype and token counts come from ``QWEN3MOE_BENCH_DEVICE``, ``QWEN3MOE_BENCH_DTYPE`` and
``QWEN3MOE_BENCH_TOKENS`` (read by ``qwen3moe_kernels.bench.machine``); the machine record (CPU model and
capability, GPU, versions, commit) goes into pytest-benchmark's JSON under ``machine_info["qwen3moe"]``.
"""

import pytest

from qwen3moe_kernels.bench import machine


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qwen3moe"] = machine.machine_info(machine.bench_device())


@pytest.fixture
def device() -> str:
    return machine.bench_device()
