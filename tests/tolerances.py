"""The suite's tolerance table: ``qwen3moe_kernels/tolerances.py`` (the reason for each number is written there),
re-exported so tests import it by a short name and ``qwen3moe-kernels check`` uses exactly the same numbers."""

from qwen3moe_kernels.tolerances import (  # noqa: F401
    TOL,
    assert_within_twice_torch_error,
    tol,
    twice_torch_error_bound,
)
