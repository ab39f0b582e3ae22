"""Shared fixtures: seeded RNG per test and a fresh record of which implementation ran."""

import pytest
import torch

import qwen3moe_kernels.dispatch as dispatch


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    dispatch.reset()
    yield
