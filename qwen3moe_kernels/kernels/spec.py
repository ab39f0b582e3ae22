"""``CompileSpec``: one launch config a Triton kernel module can ship, as ``compile-check`` compiles it ahead of time.

Every module in ``qwen3moe_kernels/kernels/`` defines ``compile_specs() -> list[CompileSpec]``: one entry per (kernel,
launch config, dtype) the library can pick at the Qwen3-30B-A3B and 235B-A22B shapes. A spec must compile the
variant Triton's JIT launches: :meth:`CompileSpec.jit_signature` types each integer argument from its value (``ints``)
as Triton 3.8 specialises it (1 becomes a constexpr; i32/i64/u64 by range; divisible by 16 when a multiple of 16) and
takes every pointer to be 16-byte aligned; ``num_stages``/``num_warps`` are the launcher's. A GEMM of 64+ rows must
use the arch's own tensor cores (``native_mma``). Why and how: ``docs/gpu_verification.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

NATIVE_MMA_MIN_BLOCK_M = 64  # wgmma works on 64-row warpgroup tiles; tcgen05's smallest M is 64 as well


def jit_int_specialization(value: int) -> tuple[str, object, bool]:
    """(type, constexpr value or None, divisible by 16) that Triton 3.8's JIT gives an int argument."""
    if isinstance(value, bool):  # a Python bool is an int, but the JIT types it u1 and never specialises it
        return "u1", None, False
    if value == 1:
        return "constexpr", 1, False
    if -(2**31) <= value < 2**31:
        ty = "i32"
    elif -(2**63) <= value < 2**63:
        ty = "i64"
    else:
        ty = "u64"
    return ty, None, value % 16 == 0


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
    native_mma: bool | None = None  # GEMM on the arch's own tensor cores (wgmma / tcgen05); None: BLOCK_M >= 64

    def requires_native_mma(self) -> bool:
        """Whether compile-check must find wgmma (sm_90) / tcgen05 (sm_100) rather than accept mma.sync."""
        if not self.gemm:
            return False
        if self.native_mma is not None:
            return bool(self.native_mma)
        block_m = self.constexprs.get("BLOCK_M")
        return isinstance(block_m, int) and block_m >= NATIVE_MMA_MIN_BLOCK_M

    def jit_signature(self) -> tuple[dict, dict]:
        """(signature, constexprs) as the JIT specialises them: each int in ``ints`` typed from its value, an
        int equal to 1 turned into the constexpr 1."""
        sig, consts = dict(self.signature), dict(self.constexprs)
        for name, value in self.ints.items():
            ty, const, _ = jit_int_specialization(value)
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = const
        return sig, consts

    def _divisible(self, name: str) -> bool:
        """Whether the JIT marks argument ``name`` divisible by 16: every pointer, and the ints that are."""
        return self.signature.get(name, "").startswith("*") or (
            name in self.ints and jit_int_specialization(self.ints[name])[2])

    def divisibility_attrs(self, arg_names: list[str]) -> dict:
        """``attrs`` for ``ASTSource``: the arguments the JIT would mark divisible by 16 at this shape."""
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names) if self._divisible(name)}

    def jit_variant(self) -> tuple:
        """What Triton's JIT compiles this spec's launch to (its cache key, less the source): every argument's
        type, constexpr value and divisibility, and the options. Specs with equal variants build the same code."""
        sig, consts = self.jit_signature()
        divisible = frozenset(n for n in self.signature if self._divisible(n))
        return (self.kernel, self.num_warps, self.num_stages, tuple(sorted(sig.items())),
                tuple(sorted(consts.items())), divisible)


def one_per_variant(candidates, template: str) -> list[CompileSpec]:
    """One spec per JIT variant of ``candidates`` [(spec, label fields)], in order: specs that compile to the same
    variant (e.g. the two models' shapes, when their ints fall in the same classes) become the first of them,
    labelled ``template`` with each field's distinct values joined by " + "."""
    groups = {}
    for spec, fields in candidates:
        _, merged = groups.setdefault(spec.jit_variant(), (spec, {k: [] for k in fields}))
        for k, v in fields.items():
            if v not in merged[k]:
                merged[k].append(v)
    return [replace(spec, label=template.format(**{k: " + ".join(v) for k, v in merged.items()}))
            for spec, merged in groups.values()]
