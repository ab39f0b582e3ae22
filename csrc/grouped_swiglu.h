// The experts forward on CPU (qwen3moe::grouped_swiglu): what the op's translation unit (grouped_swiglu_cpu.cpp:
// checks, grouping, threads, ISA choice) and the per-ISA kernels (grouped_swiglu_cpu_<isa>.cpp, all built from
// grouped_swiglu_cpu_impl.h with their own -m flags) share: the storage types, the scalar arithmetic, one call's
// description (Problem) and the kernel table each ISA exports. No ATen here: the per-ISA files include only this,
// so nothing they compile with wider instructions can be shared with (and picked by the linker for) other code.
// Design and measurements: docs/ops/grouped_swiglu.md ("CPU").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define QWEN3MOE_LOCAL inline __attribute__((always_inline))

namespace qwen3moe::experts {

// Storage types: one struct per 16-bit format so templates tell them apart.
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };
// The gate's activation, act(gate) * up: silu (Qwen3), gelu (erf), gelu_tanh, relu.
enum class Act : int { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3 };

// ISA levels, lowest first; each level's kernels only run where the CPU has every feature the level names.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };
namespace {
inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_bf16: return "avx512_bf16";
    default: return "generic";
  }
}
}  // namespace

// ------------------------------------------------------------------------------------- scalar arithmetic
// In an unnamed namespace (internal linkage): a copy compiled with AVX-512 flags must never be the one the linker
// keeps for a caller on another path.
namespace {

QWEN3MOE_LOCAL float to_f32(float v) { return v; }
QWEN3MOE_LOCAL float to_f32(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
QWEN3MOE_LOCAL float to_f32(f16_t v) {
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return static_cast<float>(h);
}

// fp32 -> storage, round to nearest even (bf16 as c10: NaN stays a quiet NaN).
template <class T>
QWEN3MOE_LOCAL T from_f32(float v);
template <>
QWEN3MOE_LOCAL float from_f32<float>(float v) {
  return v;
}
template <>
QWEN3MOE_LOCAL bf16_t from_f32<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(v != v ? 0x7FC0u : r)};
}
template <>
QWEN3MOE_LOCAL f16_t from_f32<f16_t>(float v) {
  _Float16 h = static_cast<_Float16>(v);
  f16_t out;
  std::memcpy(&out.x, &h, 2);
  return out;
}
template <class T>
QWEN3MOE_LOCAL float round_to(float v) {
  return to_f32(from_f32<T>(v));
}

}  // namespace

// ------------------------------------------------------------------------------------------ one call

// One forward call as the op translation unit hands it to the kernels. Slot s = t*k + j; the slots of hit expert h
// are sorted[hit_begin[h] .. hit_begin[h+1]) (ascending). Its first hit_wide_rows[h] rows take the "wide" kernels
// (the rows on the vector lanes) and the rest the "narrow" ones (the rows one by one, K on the lanes). The wide rows'
// h lives in hp at byte offset hit_hp[h], packed with the rows on the lanes: for the bf16 dot-product path 32-bit
// (h[2i], h[2i+1]) words [ceil(I/2)][m_pad], else fp32 [I][m_pad], m_pad = hit_wide_rows[h] rounded up to
// Kernels::lanes; the narrow rows' h is in h_rows (slot order).
struct Problem {
  DType dtype;
  Act act;
  int64_t T, H, I, k, S;        // S = T*k
  const void* x;                // [T, H] rows of x_stride elements
  int64_t x_stride;
  const void* w_gate_up;        // [E, 2I, H] contiguous, gate rows first
  const void* w_down;           // [E, H, I] contiguous
  const float* rw;              // [S] routing weights, rounded to dtype
  const int32_t* sorted;        // [S] slots grouped by expert
  int64_t n_hit;                // experts with rows
  const int32_t* hit_expert;    // [n_hit]
  const int64_t* hit_begin;     // [n_hit + 1]
  const int64_t* hit_wide_rows; // [n_hit]
  const int64_t* hit_hp;        // [n_hit] byte offsets into hp (wide experts)
  void* h_rows;                 // [S, I] dtype: narrow experts' h; every expert's when save
  void* gate_up;                // [S, 2I] dtype when save, else null
  void* hp;                     // packed h of the wide experts
  void* out;                    // [T, H] dtype
  bool save;
};

// What each ISA's translation unit exports (grouped_swiglu_cpu_impl.h builds it).
struct Kernels {
  int lanes;           // m_pad granularity of the packed layouts (the vector width in fp32 lanes)
  bool bf16_pairs;     // bf16 inputs take the dot-product (pair) path: hp holds 32-bit pair words
  int col_step;        // gate_up column blocks are multiples of this (pairs of the packed h stay in one block)
  int64_t wide_rows[3];   // per DType: an expert with at least this many rows takes the wide kernels ...
  int64_t narrow_rem[3];  // ... but up to this many rows past a multiple of lanes go narrow instead of padding
  // per-thread scratch bytes for gate_up blocks of up to `cols` columns and down blocks of `hb` columns
  int64_t (*scratch_bytes)(const Problem&, int64_t cols, int64_t hb);
  // gate_up of hit expert `hit`, columns [c0, c1) of I: h (packed or rows), gate_up rows when save
  void (*gate_up)(const Problem&, int64_t hit, int64_t c0, int64_t c1, void* scratch);
  // down for every hit expert, columns [h0, h1) of H, weighted and combined over the k slots into out
  void (*down)(const Problem&, int64_t h0, int64_t h1, void* scratch);
};

const Kernels& kernels_generic();
#if defined(__x86_64__)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_avx512_bf16();
#endif

// What the op runs now: the C++ kernels at `isa`, or, where `torch` is not null, the torch implementation
// (ops/grouped_swiglu_cpu.py) for that reason. By default the best ISA the CPU has, except that a CPU whose best is
// the scalar generic kernel gets the torch implementation (faster there: docs/ops/grouped_swiglu.md);
// QWEN3MOE_CPU_ISA names a lower ISA (generic included) or "torch". Throws a c10 ValueError on a bad override.
struct Path {
  Isa isa;
  const char* torch;
};
Path selected_path();

}  // namespace qwen3moe::experts
