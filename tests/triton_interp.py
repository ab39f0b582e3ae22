"""Test-only shim: make Triton's interpreter compute ``tl.dot`` on bf16 operands correctly.

The defect (triton 3.8.0): the interpreter keeps bf16 tensors as their raw uint16 bits (numpy has no bf16) and
its ``create_dot`` hands those arrays straight to ``np.matmul``, so a bf16 ``tl.dot`` multiplies the bit
patterns as integers: garbage. A second, smaller difference: its fp32 -> bf16 cast truncates, where the GPU
(and torch) round to nearest even; truncation is biased toward zero, which shows in long fp32 sums of rounded
values (the routing-weight gradient, a length-I dot of rounded activations).

``install()`` wraps ``InterpreterBuilder.create_dot`` so bf16 operands are first widened to fp32 exactly (bf16 is
the top half of an fp32), then multiplied in fp32 like fp16 operands already are, and makes its fp32 -> bf16 cast
round to nearest even (through torch). It changes nothing for other dtypes and nothing outside the interpreter
(compiled kernels never use this builder). Use it only in tests, in a
process that runs with ``TRITON_INTERPRET=1``.

``dot_defect_present()`` runs a tiny bf16 ``tl.dot`` kernel without the shim and says whether the interpreter
still gets it wrong; ``tests/test_grouped_swiglu.py`` asserts that it does, so the test fails (telling us to
delete this shim) the day triton fixes it.
"""

from __future__ import annotations

import os

import numpy as np


def _builder():
    from triton.runtime import interpreter

    return interpreter


def install() -> None:
    """Patch the interpreter's dot (idempotent)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the bf16 dot shim is for interpreter runs only"
    import triton.language as tl

    interp = _builder()
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_shim", False):
        return
    original = builder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_shim = True
    create_dot._original = original
    builder.create_dot = create_dot

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            import torch

            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).bfloat16()
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    cast_impl._original = original_cast
    builder.cast_impl = cast_impl


def uninstall() -> None:
    builder = _builder().InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_shim", False):
        builder.create_dot = builder.create_dot._original
        builder.cast_impl = builder.cast_impl._original


def _bf16_dot(a, b):
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    dot_kernel[(1,)](a, b, c, N=a.shape[0])
    return c


def dot_defect_present() -> bool:
    """True while the interpreter's bf16 tl.dot (without the shim) is wrong on a 16x16 product."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    want = a.float() @ b.float()
    was = getattr(_builder().InterpreterBuilder.create_dot, "_bf16_shim", False)
    uninstall()
    try:
        got = _bf16_dot(a, b)
    finally:
        if was:
            install()
    return not torch.allclose(got, want, atol=1e-3, rtol=1e-3)


def shim_fixes_dot() -> bool:
    """True when the shimmed interpreter's bf16 tl.dot matches an fp32 product of the same bf16 values."""
    import torch

    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    install()
    return torch.allclose(_bf16_dot(a, b), a.float() @ b.float(), atol=1e-4, rtol=1e-4)
