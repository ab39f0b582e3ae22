"""The tolerance table, in the package so that ``qwen3moe-kernels check`` and the test suite use the same numbers.

``tests/tolerances.py`` re-exports everything here and keeps the reasons for each number in its docstring
(summarised again below, so the package reads on its own).

* ``TOL[kind][dtype] = (atol, rtol)`` for ``torch.testing.assert_close`` against the reference run in the same
  dtype. ``kind`` says how much arithmetic separates kernel and reference:
  - ``"exact"``: index ops and copies (permute, unpermute with one-hot weights): bit-identical.
  - ``"elementwise"``: a few flops per element in fp32 (norms, rope, softmax): fp32 reassociation of a
    length-H reduction gives ~1e-6 relative; fp16/bf16 outputs are rounded once, so one unit in the last place
    (fp16 2^-10 ~ 1e-3, bf16 2^-7 ~ 8e-3) relative, plus the same in absolute near zero.
  - ``"gemm"``: a K-long dot product (K up to 4096 here). fp32: the CPU BLAS and Triton sum in different orders,
    ~sqrt(K) * 2^-24 relative to the row norm, so 1e-4 / 1e-4 leaves room. Low precision outputs are rounded once
    more after the sum: 2 ulp.
  - ``"router"``: the router's softmax runs in fp32 whatever the logits dtype, so its weights are fp32.
  - ``"norm"``: RMSNorm outputs round twice in fp16/bf16 (normed, then weight * normed), so an fp32-ulp change of
    rstd from another summation order can end 2 ulps away: 2 ulps for fp16/bf16, fp32 as ``"elementwise"``.
* ``assert_within_twice_torch_error(out, ref_fp32, torch_lowp)``: the flash-attention rule for low precision
  GEMM kernels: the kernel's error against an fp32 reference may be at most about twice the error PyTorch's own
  computation in the same low precision makes (plus a tiny absolute floor for outputs that are exactly zero).
"""

from __future__ import annotations

import torch

TOL = {
    "exact": {torch.float32: (0.0, 0.0), torch.float16: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)},
    "elementwise": {torch.float32: (1e-5, 1.3e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)},
    "gemm": {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
    # RMSNorm outputs (rms_norm, fused_add_rms_norm, qk_norm_rope): two roundings in the dtype, normed and then
    # weight * normed (and the rotation's after them). A kernel's fp32 sum of squares in another order than torch's
    # moves rstd by an fp32 ulp, which can flip the first rounding; the second then lands up to 2 ulps away (seen:
    # 1 element in 8M at bf16 2048 x 4096). fp32 as elementwise.
    "norm": {torch.float32: (1e-5, 1.3e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
    # The router's softmax runs in fp32 whatever the logits dtype: weights are fp32 in every case.
    "router": {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-5)},
    # Whole tiny model (logits, loss, aux loss, router logits) against transformers: the same ops in the same
    # order, so fp32 differs only by GEMM blocking of a few short (K <= 96) dots per layer; seen ~1e-6.
    "model": {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
}


def tol(kind: str, dtype: torch.dtype) -> dict:
    atol, rtol = TOL[kind][dtype]
    return {"atol": atol, "rtol": rtol}


def twice_torch_error_bound(ref_fp32, torch_lowp, factor: float = 2.0, floor: float = 1e-5) -> float:
    """The largest max-abs error against ``ref_fp32`` the flash-attention rule allows a low-precision kernel."""
    torch_err = (torch_lowp.float() - ref_fp32.float()).abs().max().item() if ref_fp32.numel() else 0.0
    return factor * torch_err + floor


def assert_within_twice_torch_error(out, ref_fp32, torch_lowp, factor: float = 2.0, floor: float = 1e-5):
    """Kernel error vs an fp32 reference <= factor * (PyTorch's own low-precision error) + floor, in max-abs."""
    kernel_err = (out.float() - ref_fp32.float()).abs().max().item()
    torch_err = (torch_lowp.float() - ref_fp32.float()).abs().max().item()
    assert kernel_err <= factor * torch_err + floor, (
        f"kernel max error {kernel_err:.3e} exceeds {factor} x PyTorch's own error {torch_err:.3e} + {floor}"
    )
