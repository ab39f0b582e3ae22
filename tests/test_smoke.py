"""The package imports, the extension loads and the qwen3moe op namespace exists."""

import torch

import qwen3moe_kernels


def test_import_and_extension():
    import qwen3moe_kernels._C  # noqa: F401

    assert qwen3moe_kernels.__version__
    assert torch.ops.qwen3moe is not None


def test_cpu_compute_dtype_follows_native_bf16(monkeypatch):
    # One rule for CPU paths and benchmarks: bf16 stays bf16 only where the CPU has native bf16 dot products.
    from qwen3moe_kernels import cpu
    from qwen3moe_kernels.ops.fused_moe import cpu_compute_dtype

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert cpu_compute_dtype(torch.bfloat16) == torch.float32
    assert cpu_compute_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert cpu_compute_dtype(torch.bfloat16) == torch.bfloat16
