"""Shared fixtures: seeded RNG per test and a fresh record of which implementation ran; the ``gpu`` marker; the
interpreter tests (``tests/interp``) left to their own process."""

from pathlib import Path

import pytest
import torch

from qwen3moe_kernels import recorder

INTERP = Path(__file__).resolve().parent / "interp"


def pytest_ignore_collect(collection_path, config):
    # tests/interp needs TRITON_INTERPRET=1 from the start of its process: tests/test_triton_interpreter.py runs it
    # in one; it is collected here only when named on the command line (its conftest then sets the variable)
    if Path(collection_path).resolve() == INTERP:
        named = [Path(str(a).split("::")[0]).resolve() for a in config.args]
        return not any(p == INTERP or INTERP in p.parents for p in named)
    return None


def pytest_collection_modifyitems(config, items):
    # one GPU rule for the suite: tests marked gpu skip on a machine without CUDA
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    recorder.reset()
    yield
