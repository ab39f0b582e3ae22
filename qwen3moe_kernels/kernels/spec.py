"""How a Triton kernel module declares the launch configs it can ship, for ahead-of-time compile checks.

Every module in ``qwen3moe_kernels/kernels/`` that holds ``@triton.jit`` kernels defines

    def compile_specs() -> list[CompileSpec]: ...

returning one entry per (kernel, launch config, dtype) the library can pick at the Qwen3-30B-A3B and
Qwen3-235B-A22B shapes, for decode and prefill. ``qwen3moe-kernels compile-check`` compiles each for sm_90 and
sm_100 without a GPU and reads registers, spills, shared memory and tensor-core use from the result.

At launch, Triton's JIT specialises every pointer whose address is a multiple of 16 bytes and every integer
argument that is a multiple of 16 (``tt.divisibility = 16``), and that is what lets it vectorise loads. An AOT
compile without those hints builds a different, scalar variant that the library never runs, so a spec gives the
integer arguments' values at its shape in ``ints``; compile-check marks those divisible by 16, and every pointer
(torch's allocations are 16-byte aligned), exactly as the JIT would.
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
    ints: dict = field(default_factory=dict)  # integer argument name -> its value at this shape (see above)

    def divisibility_attrs(self, arg_names: list[str]) -> dict:
        """``attrs`` for ``ASTSource``: the arguments the JIT would mark divisible by 16 at this shape."""
        attrs = {}
        for i, name in enumerate(arg_names):
            ty = self.signature.get(name, "")
            if ty.startswith("*") or (name in self.ints and self.ints[name] % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return attrs
