"""How a Triton kernel module declares the launch configs it can ship, for ahead-of-time compile checks.

Every module in ``qwen3moe_kernels/kernels/`` that holds ``@triton.jit`` kernels defines

    def compile_specs() -> list[CompileSpec]: ...

returning one entry per (kernel, launch config, dtype) the library can pick at the Qwen3-30B-A3B and
Qwen3-235B-A22B shapes, for decode and prefill. ``qwen3moe-kernels compile-check`` compiles each for sm_90 and
sm_100 without a GPU and reads registers, spills, shared memory and tensor-core use from the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    kernel: str  # the kernel's name, as in the table (usually the @triton.jit function's name)
    fn: object  # the @triton.jit function
    signature: dict  # every argument name -> triton type string: "*bf16", "*i32", "i32", "fp32", "constexpr"
    constexprs: dict  # constexpr argument name -> value (tile sizes, flags)
    label: str  # which config this is, e.g. "30B-A3B prefill bf16 BM=128 BN=128 BK=64"
    num_warps: int = 4
    num_stages: int = 3
    gemm: bool = False  # a GEMM: must compile to tensor-core instructions (wgmma / tcgen05 / mma)
    extra: dict = field(default_factory=dict)  # anything else worth printing
