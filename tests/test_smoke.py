"""The package imports, the extension loads and the qwen3moe op namespace exists."""

import torch

import qwen3moe_kernels


def test_import_and_extension():
    import qwen3moe_kernels._C  # noqa: F401

    assert qwen3moe_kernels.__version__
    assert torch.ops.qwen3moe is not None
