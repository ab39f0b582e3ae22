"""One table of tolerances for the whole test suite, with the reason for each number.

Two kinds of check:

* ``TOL[kind][dtype] = (atol, rtol)`` for ``torch.testing.assert_close`` against the reference run in the same
  dtype. ``kind`` says how much arithmetic separates kernel and reference:
  - ``"exact"``: index ops and copies (permute, unpermute with one-hot weights): bit-identical.
  - ``"elementwise"``: a few flops per element in fp32 (norms, rope, softmax): fp32 reassociation of a
    length-H reduction gives ~1e-6 relative; fp16/bf16 outputs are rounded once, so one unit in the last place
    (fp16 2^-10 ~ 1e-3, bf16 2^-7 ~ 8e-3) relative, plus the same in absolute near zero.
  - ``"gemm"``: a K-long dot product (K up to 4096 here). fp32: the CPU BLAS and Triton sum in different orders,
    ~sqrt(K) * 2^-24 relative to the row norm, so 1e-4 / 1e-4 leaves room. Low precision outputs are rounded once
    more after the sum: 2 ulp.
* ``assert_within_twice_torch_error(out, ref_fp32, torch_lowp)``: the flash-attention rule for low precision
  GEMM kernels: the kernel's error against an fp32 reference may be at most about twice the error PyTorch's own
  computation in the same low precision makes (plus a tiny absolute floor for outputs that are exactly zero).
"""

# The table itself lives in the package (qwen3moe_kernels/tolerances.py) so that `qwen3moe-kernels check` uses
# exactly the numbers the tests use. Add new rows (with their reason) there.
from qwen3moe_kernels.tolerances import (  # noqa: F401
    TOL,
    assert_within_twice_torch_error,
    tol,
    twice_torch_error_bound,
)
