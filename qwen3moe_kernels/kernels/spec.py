"""How a Triton kernel module declares the launch configs it can ship, for ahead-of-time compile checks.

Every module in ``qwen3moe_kernels/kernels/`` that holds ``@triton.jit`` kernels defines

    def compile_specs() -> list[CompileSpec]: ...

returning one entry per (kernel, launch config, dtype) the library can pick at the Qwen3-30B-A3B and
Qwen3-235B-A22B shapes, for decode and prefill. ``qwen3moe-kernels compile-check`` compiles each for sm_90 and
sm_100 without a GPU and reads registers, spills, shared memory and tensor-core use from the result.

A spec compiles the variant the JIT launches. At launch, Triton's JIT (3.8: ``native_specialize_impl``, called
from ``triton/runtime/jit.py``) specialises each argument on its value:

* a pointer whose address is a multiple of 16 bytes is marked ``tt.divisibility = 16`` (torch's allocations
  are 16-byte aligned; a spec takes every pointer to be);
* an integer equal to 1 becomes the constant 1 (a constexpr);
* any other integer is typed ``i32`` when it lies in [-2^31, 2^31), ``i64`` when it lies in [-2^63, 2^63) and
  ``u64`` above, and is marked divisible by 16 when it is a multiple of 16 (0 included).

So a spec gives every integer argument's value at its shape in ``ints``, and :meth:`CompileSpec.jit_signature`
types those arguments from their values exactly as above (the type written for them in ``signature`` is
replaced). An AOT compile without this builds a different variant that the library never runs (scalar loads
where the JIT would vectorise, a 64-bit stride where it uses 32 bits). No kernel here uses ``do_not_specialize``;
this rule does not model it. ``num_stages`` and ``num_warps`` must be what the launcher passes.

``native_mma`` (GEMMs): whether the spec's ``tl.dot`` must use the arch's own tensor-core instructions (``wgmma``
on sm_90a, ``tcgen05`` on sm_100a). Left None it follows the tile: a ``BLOCK_M`` of 64 or more must (those
instructions work on 64-row tiles; Triton takes them for such tiles), a narrower decode tile may run on
``mma.sync``.
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
