"""The Triton kernels under Triton's interpreter, on CPU tensors: ``TRITON_INTERPRET=1`` must be set before triton
is first imported, so these tests run in a process of their own. ``tests/test_triton_interpreter.py`` starts one
from the main suite; directly: ``python -m pytest tests/interp`` (this file sets the variable).

Every ``torch.empty`` is poisoned (NaN, or -7 for integers) so an output element a kernel never writes shows up.
bf16 runs through the test-only ``tests/triton_interp.py`` shim (the interpreter's bf16 ``tl.dot`` is wrong).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
# @triton.jit reads the variable when a kernel module is imported: one imported before now is compiled code
_early = [m for m in sys.modules if m.startswith("qwen3moe_kernels.kernels.")]
if _early:
    raise RuntimeError(f"tests/interp: {_early} were imported before TRITON_INTERPRET=1 was set")

import pytest  # noqa: E402
import torch  # noqa: E402

import triton_interp  # noqa: E402

_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


@pytest.fixture
def bf16_dot():
    """The interpreter with the bf16 dot shim, for the test's duration."""
    triton_interp.install()
    yield
    triton_interp.uninstall()


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    """Each kernel test in fp32, fp16 and bf16 (bf16 with the dot shim installed)."""
    if request.param == "bf16":
        request.getfixturevalue("bf16_dot")
    return DTYPES[request.param]
