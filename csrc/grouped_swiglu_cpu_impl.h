// The experts' CPU kernels, written once over a vector type V and compiled once per ISA: each
// grouped_swiglu_cpu_<isa>.cpp defines QWEN3MOE_ISA_<ISA>, includes this file with its own -m flags (setup.py) and
// so exports kernels_<isa>() (the Kernels table of grouped_swiglu.h). Everything else here has internal linkage.
//
// Two microkernel shapes, both reading the weights in their native K-contiguous layout ([E, 2I, H], [E, H, I]):
// - "narrow" (few rows per expert, decode): lanes over K. A tile of MR activation rows x NR weight rows keeps MR*NR
//   vector accumulators, each weight row streamed once per MR rows; one horizontal sum per output at the end.
// - "wide" (many rows, prefill): lanes over the expert's rows. The activations are packed once with the rows on the
//   vector lanes (x per block, h by the gate_up epilogue itself), each weight element is broadcast and multiplied
//   into MV vectors of rows: an outer product with no weight repacking and no horizontal sums.
// With AVX512-BF16 and bf16 inputs both use vdpbf16ps on (k, k+1) pairs; otherwise fp32 FMA with the 16-bit
// weights widened in registers. gate_up computes gate and up rows of the same columns in one tile and applies
// act(gate) * up to the fp32 accumulators (one rounding to x's dtype); down multiplies each slot's fp32 product by
// its routing weight and the k slots of a token are summed in fp32 in the order j = 0..k-1 within the same block.
// Every output's arithmetic is fixed by the ISA and the expert's row count alone: not by the thread count or the
// block it lands in. docs/ops/grouped_swiglu.md ("CPU") has the design and the measurements.

#if !defined(QWEN3MOE_ISA_GENERIC)
// GCC 12 warns (-Wuninitialized) inside its own AVX-512 headers: the _mm*_undefined_* operands of the mask builtins
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <type_traits>

#include "grouped_swiglu.h"

#if defined(QWEN3MOE_ISA_AVX512_BF16)
#define QWEN3MOE_V512 1
#define QWEN3MOE_DP 1
#define QWEN3MOE_ISA_ENUM Isa::avx512_bf16
#define QWEN3MOE_KERNELS_FN kernels_avx512_bf16
#elif defined(QWEN3MOE_ISA_AVX512)
#define QWEN3MOE_V512 1
#define QWEN3MOE_DP 0
#define QWEN3MOE_ISA_ENUM Isa::avx512
#define QWEN3MOE_KERNELS_FN kernels_avx512
#elif defined(QWEN3MOE_ISA_AVX2)
#define QWEN3MOE_V256 1
#define QWEN3MOE_DP 0
#define QWEN3MOE_ISA_ENUM Isa::avx2
#define QWEN3MOE_KERNELS_FN kernels_avx2
#elif defined(QWEN3MOE_ISA_GENERIC)
#define QWEN3MOE_DP 0
#define QWEN3MOE_ISA_ENUM Isa::generic
#define QWEN3MOE_KERNELS_FN kernels_generic
#else
#error "define one QWEN3MOE_ISA_* before including grouped_swiglu_cpu_impl.h"
#endif

namespace qwen3moe::experts {
namespace {

#define QI inline __attribute__((always_inline))

QI int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
QI int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
QI int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
QI uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// --------------------------------------------------------------------------------------------- vectors

// Polynomial constants shared by every width: Cephes' expf (range reduction by ln 2 split in two, degree-6
// polynomial, ~1 ulp) and Numerical Recipes' erfc (fractional error < 1.2e-7 everywhere).
constexpr float kExpHi = 88.3762626647949f, kExpLo = -88.3762626647949f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kErfcP[10] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                              -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};

#if defined(QWEN3MOE_V512)
struct V {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static QI __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static QI F zero() { return _mm512_setzero_ps(); }
  static QI F set1(float v) { return _mm512_set1_ps(v); }
  static QI F load(const float* p) { return _mm512_loadu_ps(p); }
  static QI F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static QI void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static QI void store_n(float* p, F v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static QI F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static QI F add(F a, F b) { return _mm512_add_ps(a, b); }
  static QI F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static QI F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static QI F div(F a, F b) { return _mm512_div_ps(a, b); }
  // max(c, v) / min(c, v) returning v when v is NaN (the second operand)
  static QI F max_c(F c, F v) { return _mm512_max_ps(c, v); }
  static QI F min_c(F c, F v) { return _mm512_min_ps(c, v); }
  static QI F abs(F v) { return _mm512_abs_ps(v); }
  static QI F select_ge0(F g, F a, F b) {  // g >= 0 ? a : b (NaN: b)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, zero(), _CMP_GE_OQ), b, a);
  }
  static QI F exp(F x) {
    x = max_c(set1(kExpLo), min_c(set1(kExpHi), x));
    F n = _mm512_roundscale_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    F p = set1(kExpP[0]);
    for (int i = 1; i < 6; ++i) p = fma(p, r, set1(kExpP[i]));
    F y = add(fma(p, mul(r, r), r), set1(1.0f));
    return _mm512_scalef_ps(y, n);
  }
  static QI float hsum(F v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
  }
  // storage loads (widened to fp32), stores (rounded to nearest even), broadcasts
  static QI F load_t(const float* p) { return load(p); }
  static QI F load_t_n(const float* p, int n) { return load_n(p, n); }
  static QI F widen_bf16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
  static QI F load_t(const bf16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static QI F load_t_n(const bf16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static QI F load_t(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static QI F load_t_n(const f16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static QI I bf16_bits(F v) {  // round to nearest even in the low 16 bits of each lane (NaN: quiet)
    I u = _mm512_castps_si512(v);
    I r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
        16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  }
  static QI __m256i f16_bits(F v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static QI void store_t(float* p, F v) { store(p, v); }
  static QI void store_t_n(float* p, F v, int n) { store_n(p, v, n); }
  static QI void store_t(bf16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
  static QI void store_t_n(bf16_t* p, F v, int n) { _mm512_mask_cvtepi32_storeu_epi16(p, mask(n), bf16_bits(v)); }
  static QI void store_t(f16_t* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f16_bits(v)); }
  static QI void store_t_n(f16_t* p, F v, int n) { _mm256_mask_storeu_epi16(p, mask(n), f16_bits(v)); }
  static QI F round_t(F v, float*) { return v; }
  static QI F round_t(F v, bf16_t*) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
  static QI F round_t(F v, f16_t*) { return _mm512_cvtph_ps(f16_bits(v)); }
  static QI F bcast(const float* p) { return set1(*p); }
  static QI F bcast(const bf16_t* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(uint32_t{p->x} << 16))); }
  static QI F bcast(const f16_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(p->x))); }
  // in-place transpose of a 16 x 16 tile of 32-bit words
  static QI void transpose(I r[16]) {
    I t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
      r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
      r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
        t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
      r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
  }
  static QI I as_i(F v) { return _mm512_castps_si512(v); }
  static QI void store_i(void* p, I v) { _mm512_storeu_si512(p, v); }
};
#elif defined(QWEN3MOE_V256)
struct V {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static QI __m256i mask(int n) {  // lanes < n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static QI F zero() { return _mm256_setzero_ps(); }
  static QI F set1(float v) { return _mm256_set1_ps(v); }
  static QI F load(const float* p) { return _mm256_loadu_ps(p); }
  static QI F load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static QI void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static QI void store_n(float* p, F v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static QI F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static QI F add(F a, F b) { return _mm256_add_ps(a, b); }
  static QI F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static QI F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static QI F div(F a, F b) { return _mm256_div_ps(a, b); }
  static QI F max_c(F c, F v) { return _mm256_max_ps(c, v); }
  static QI F min_c(F c, F v) { return _mm256_min_ps(c, v); }
  static QI F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static QI F select_ge0(F g, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(g, zero(), _CMP_GE_OQ)); }
  static QI F exp(F x) {
    x = max_c(set1(kExpLo), min_c(set1(kExpHi), x));
    F n = _mm256_round_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    F p = set1(kExpP[0]);
    for (int i = 1; i < 6; ++i) p = fma(p, r, set1(kExpP[i]));
    F y = add(fma(p, mul(r, r), r), set1(1.0f));
    // 2^n in two halves so n = -127 (x near the lower clamp) stays a normal scale
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    F s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    F s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    return mul(mul(y, s1), s2);
  }
  static QI float hsum(F v) {
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
  }
  static QI F load_t(const float* p) { return load(p); }
  static QI F load_t_n(const float* p, int n) { return load_n(p, n); }
  static QI F widen_bf16(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
  static QI __m128i load16_n(const void* p, int n) {  // n < 8 16-bit elements, zero filled
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, static_cast<size_t>(n) * 2);
    return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  static QI F load_t(const bf16_t* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static QI F load_t_n(const bf16_t* p, int n) { return widen_bf16(load16_n(p, n)); }
  static QI F load_t(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static QI F load_t_n(const f16_t* p, int n) { return _mm256_cvtph_ps(load16_n(p, n)); }
  static QI I bf16_bits(F v) {
    I u = _mm256_castps_si256(v);
    I r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))),
        16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  static QI __m128i pack16(I r) {  // low 16 bits of 8 lanes (each < 2^16) -> 8 uint16
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static QI __m128i f16_bits(F v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static QI void store16_n(void* p, __m128i v, int n) {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), v);
    std::memcpy(p, tmp, static_cast<size_t>(n) * 2);
  }
  static QI void store_t(float* p, F v) { store(p, v); }
  static QI void store_t_n(float* p, F v, int n) { store_n(p, v, n); }
  static QI void store_t(bf16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack16(bf16_bits(v))); }
  static QI void store_t_n(bf16_t* p, F v, int n) { store16_n(p, pack16(bf16_bits(v)), n); }
  static QI void store_t(f16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16_bits(v)); }
  static QI void store_t_n(f16_t* p, F v, int n) { store16_n(p, f16_bits(v), n); }
  static QI F round_t(F v, float*) { return v; }
  static QI F round_t(F v, bf16_t*) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
  static QI F round_t(F v, f16_t*) { return _mm256_cvtph_ps(f16_bits(v)); }
  static QI F bcast(const float* p) { return set1(*p); }
  static QI F bcast(const bf16_t* p) { return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(uint32_t{p->x} << 16))); }
  static QI F bcast(const f16_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(p->x))); }
  static QI void transpose(I r[8]) {
    __m256 a[8], b[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_castsi256_ps(r[i]);
    for (int i = 0; i < 4; ++i) {
      b[2 * i] = _mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]);
      b[2 * i + 1] = _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      a[4 * i + 0] = _mm256_shuffle_ps(b[4 * i + 0], b[4 * i + 2], 0x44);
      a[4 * i + 1] = _mm256_shuffle_ps(b[4 * i + 0], b[4 * i + 2], 0xEE);
      a[4 * i + 2] = _mm256_shuffle_ps(b[4 * i + 1], b[4 * i + 3], 0x44);
      a[4 * i + 3] = _mm256_shuffle_ps(b[4 * i + 1], b[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = _mm256_castps_si256(_mm256_permute2f128_ps(a[j], a[4 + j], 0x20));
      r[4 + j] = _mm256_castps_si256(_mm256_permute2f128_ps(a[j], a[4 + j], 0x31));
    }
  }
  static QI I as_i(F v) { return _mm256_castps_si256(v); }
  static QI void store_i(void* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#else  // generic: one lane, plain C++ (any x86-64, and the scalar reference of the vector code's structure)
struct V {
  using F = float;
  using I = uint32_t;
  static constexpr int W = 1;
  static QI F zero() { return 0.0f; }
  static QI F set1(float v) { return v; }
  static QI F load(const float* p) { return *p; }
  static QI F load_n(const float* p, int) { return *p; }
  static QI void store(float* p, F v) { *p = v; }
  static QI void store_n(float* p, F v, int) { *p = v; }
  static QI F fma(F a, F b, F c) { return __builtin_fmaf(a, b, c); }
  static QI F add(F a, F b) { return a + b; }
  static QI F sub(F a, F b) { return a - b; }
  static QI F mul(F a, F b) { return a * b; }
  static QI F div(F a, F b) { return a / b; }
  static QI F max_c(F c, F v) { return c > v ? c : v; }
  static QI F min_c(F c, F v) { return c < v ? c : v; }
  static QI F abs(F v) { return __builtin_fabsf(v); }
  static QI F select_ge0(F g, F a, F b) { return g >= 0.0f ? a : b; }
  static QI F exp(F x) { return __builtin_expf(x); }
  static QI float hsum(F v) { return v; }
  template <class T>
  static QI F load_t(const T* p) {
    return to_f32(*p);
  }
  template <class T>
  static QI F load_t_n(const T* p, int) {
    return to_f32(*p);
  }
  template <class T>
  static QI void store_t(T* p, F v) {
    *p = from_f32<T>(v);
  }
  template <class T>
  static QI void store_t_n(T* p, F v, int) {
    *p = from_f32<T>(v);
  }
  template <class T>
  static QI F round_t(F v, T*) {
    return round_to<T>(v);
  }
  template <class T>
  static QI F bcast(const T* p) {
    return to_f32(*p);
  }
  static QI void transpose(I*) {}
  static QI I as_i(F v) {
    I u;
    std::memcpy(&u, &v, 4);
    return u;
  }
  static QI void store_i(void* p, I v) { std::memcpy(p, &v, 4); }
};
#endif

using F = V::F;
constexpr int W = V::W;

// -------------------------------------------------------------------------------------------- activation

template <Act ACT>
QI F act(F g) {
  if constexpr (ACT == Act::silu) {
    return V::div(g, V::add(V::set1(1.0f), V::exp(V::sub(V::zero(), g))));
  } else if constexpr (ACT == Act::gelu) {
    // 0.5 g (1 + erf(g / sqrt 2)) with 1 + erf = 2 - erfc(z) for g >= 0 and erfc(z) below (z = |g| / sqrt 2): no
    // cancellation on the negative side, where gelu is small
    F z = V::mul(V::abs(g), V::set1(0.7071067811865476f));
    F t = V::div(V::set1(1.0f), V::fma(V::set1(0.5f), z, V::set1(1.0f)));
    F p = V::set1(kErfcP[0]);
    for (int i = 1; i < 10; ++i) p = V::fma(p, t, V::set1(kErfcP[i]));
    F erfc = V::mul(t, V::exp(V::sub(p, V::mul(z, z))));
    F one_plus_erf = V::select_ge0(g, V::sub(V::set1(2.0f), erfc), erfc);
    return V::mul(V::mul(V::set1(0.5f), g), one_plus_erf);
  } else if constexpr (ACT == Act::gelu_tanh) {
    // 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y)), y = sqrt(2/pi) (g + 0.044715 g^3)
    F g3 = V::mul(V::mul(g, g), g);
    F y2 = V::mul(V::set1(-2.0f * 0.7978845608028654f), V::fma(V::set1(0.044715f), g3, g));
    return V::div(g, V::add(V::set1(1.0f), V::exp(y2)));
  } else {
    return V::max_c(V::zero(), g);
  }
}

// h = act(g) * u over n contiguous columns, rounded to T; the saved gate/up too when gs/us are given.
template <class T, Act ACT>
void act_mul_row(const float* g, const float* u, int64_t n, T* h, T* gs, T* us) {
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    F gv = V::load(g + c), uv = V::load(u + c);
    V::store_t(h + c, V::mul(act<ACT>(gv), uv));
    if (gs != nullptr) {
      V::store_t(gs + c, gv);
      V::store_t(us + c, uv);
    }
  }
  if (c < n) {
    const int r = static_cast<int>(n - c);
    F gv = V::load_n(g + c, r), uv = V::load_n(u + c, r);
    V::store_t_n(h + c, V::mul(act<ACT>(gv), uv), r);
    if (gs != nullptr) {
      V::store_t_n(gs + c, gv, r);
      V::store_t_n(us + c, uv, r);
    }
  }
}

// ------------------------------------------------------------------------------------------ microkernels

// Narrow, fp32 FMA: out[m][n] = sum_k A[m][k] * B[n][k] for MR fp32 rows A and NR weight rows B of TW.
template <class TW, int MR, int NR>
void dot_fma(const float* const* A, const TW* const* B, int64_t K, float* out) {
  F acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = V::zero();
  int64_t kk = 0;
  for (; kk + W <= K; kk += W) {
    F a[MR];
    for (int m = 0; m < MR; ++m) a[m] = V::load(A[m] + kk);
    for (int n = 0; n < NR; ++n) {
      F b = V::load_t(B[n] + kk);
      for (int m = 0; m < MR; ++m) acc[m][n] = V::fma(a[m], b, acc[m][n]);
    }
  }
  if (kk < K) {
    const int r = static_cast<int>(K - kk);
    F a[MR];
    for (int m = 0; m < MR; ++m) a[m] = V::load_n(A[m] + kk, r);
    for (int n = 0; n < NR; ++n) {
      F b = V::load_t_n(B[n] + kk, r);
      for (int m = 0; m < MR; ++m) acc[m][n] = V::fma(a[m], b, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * NR + n] = V::hsum(acc[m][n]);
}

// Wide, fp32 FMA: out[n][m] = sum_k XP[k][m] * B[n][k] for MV vectors of rows packed [K][ld] (fp32) and NR weight
// rows; out is [NR][MV * W].
template <class TW, int MV, int NR>
void outer_fma(const float* XP, int64_t ld, const TW* const* B, int64_t K, float* out) {
  F acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = V::zero();
  for (int64_t kk = 0; kk < K; ++kk) {
    F a[MV];
    for (int v = 0; v < MV; ++v) a[v] = V::load(XP + kk * ld + v * W);
    for (int n = 0; n < NR; ++n) {
      F b = V::bcast(B[n] + kk);
      for (int v = 0; v < MV; ++v) acc[n][v] = V::fma(a[v], b, acc[n][v]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) V::store(out + n * MV * W + v * W, acc[n][v]);
}

#if QWEN3MOE_DP
// Narrow, bf16 pairs: vdpbf16ps on 32 k at a time.
template <int MR, int NR>
void dot_dp(const bf16_t* const* A, const bf16_t* const* B, int64_t K, float* out) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 <= K; kk += 32) {
    __m512bh a[MR];
    for (int m = 0; m < MR; ++m) a[m] = (__m512bh)_mm512_loadu_si512(A[m] + kk);
    for (int n = 0; n < NR; ++n) {
      __m512bh b = (__m512bh)_mm512_loadu_si512(B[n] + kk);
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a[m], b);
    }
  }
  if (kk < K) {
    const __mmask32 mk = static_cast<__mmask32>((1ull << (K - kk)) - 1);
    __m512bh a[MR];
    for (int m = 0; m < MR; ++m) a[m] = (__m512bh)_mm512_maskz_loadu_epi16(mk, A[m] + kk);
    for (int n = 0; n < NR; ++n) {
      __m512bh b = (__m512bh)_mm512_maskz_loadu_epi16(mk, B[n] + kk);
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a[m], b);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * NR + n] = V::hsum(acc[m][n]);
}

// Wide, bf16 pairs: XP holds 32-bit (x[2p], x[2p+1]) words [ceil(K/2)][ld]; each weight pair is broadcast.
template <int MV, int NR>
void outer_dp(const uint32_t* XP, int64_t ld, const bf16_t* const* B, int64_t K, float* out) {
  __m512 acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_setzero_ps();
  const int64_t P = K / 2;
  for (int64_t p = 0; p < P; ++p) {
    __m512bh a[MV];
    for (int v = 0; v < MV; ++v) a[v] = (__m512bh)_mm512_loadu_si512(XP + p * ld + v * 16);
    for (int n = 0; n < NR; ++n) {
      __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(B[n] + 2 * p)));
      for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], a[v], b);
    }
  }
  if (K & 1) {  // the last k alone: its pair's high half is zero on both sides
    __m512bh a[MV];
    for (int v = 0; v < MV; ++v) a[v] = (__m512bh)_mm512_loadu_si512(XP + P * ld + v * 16);
    for (int n = 0; n < NR; ++n) {
      __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(B[n][K - 1].x));
      for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], a[v], b);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(out + n * MV * 16 + v * 16, acc[n][v]);
}
#endif

// ------------------------------------------------------------------------------------- tile parameters
//
// Registers: AVX-512 has 32 vector registers, so 24 accumulators plus the operands; AVX2 has 16, so 12. Narrow
// tiles take more weight rows when there are fewer activation rows: more weight rows streaming at once keeps more
// memory requests in flight (measured: docs/ops/grouped_swiglu.md).
#if defined(QWEN3MOE_V512)
constexpr int kMaxMR = 4;                // narrow: activation rows per tile
constexpr int kWideMV = 2;               // wide: vectors of rows per tile
constexpr int kWideNC = 6;               // wide gate_up: columns per tile (gate + up rows: 12)
constexpr int kWideNR = 12;              // wide down: weight rows per tile
// narrow gate_up columns per tile (gate + up rows 2*NC) and down rows per tile, by the expert's row count
QI int narrow_nc(int64_t M) { return M <= 2 ? 6 : (M == 3 ? 4 : 3); }
QI int narrow_nr(int64_t M) { return M <= 2 ? 12 : (M == 3 ? 8 : 6); }
#elif defined(QWEN3MOE_V256)
constexpr int kMaxMR = 2;
constexpr int kWideMV = 2;
constexpr int kWideNC = 3;
constexpr int kWideNR = 6;
QI int narrow_nc(int64_t M) { return M <= 1 ? 4 : 3; }
QI int narrow_nr(int64_t M) { return M <= 1 ? 8 : 6; }
#else
constexpr int kMaxMR = 4;
constexpr int kWideMV = 1;
constexpr int kWideNC = 2;
constexpr int kWideNR = 4;
QI int narrow_nc(int64_t) { return 2; }
QI int narrow_nr(int64_t) { return 4; }
#endif
constexpr int kMaxNarrowNR = 12;          // the largest narrow_nr (and 2 * narrow_nc)

// A narrow tile of mr rows (1..kMaxMR) and nr weight rows (one of narrow_nr / 2*narrow_nc), chosen at run time.
template <class TA, class TW, int MR, int NR>
QI void dot_call(const TA* const* A, const TW* const* B, int64_t K, float* out) {
#if QWEN3MOE_DP
  if constexpr (std::is_same_v<TA, bf16_t>) {
    dot_dp<MR, NR>(A, B, K, out);
    return;
  } else
#endif
  {
    dot_fma<TW, MR, NR>(A, B, K, out);
  }
}

template <class TA, class TW, int NR>
QI void dot_mr(int mr, const TA* const* A, const TW* const* B, int64_t K, float* out) {
  static_assert(kMaxMR <= 4, "dot_mr covers up to 4 rows");
  switch (mr) {
    case 1: dot_call<TA, TW, 1, NR>(A, B, K, out); break;
    case 2:
      if constexpr (2 * NR <= 24 && kMaxMR >= 2) dot_call<TA, TW, 2, NR>(A, B, K, out);
      break;
    case 3:
      if constexpr (3 * NR <= 24 && kMaxMR >= 3) dot_call<TA, TW, 3, NR>(A, B, K, out);
      break;
    default:
      if constexpr (4 * NR <= 24 && kMaxMR >= 4) dot_call<TA, TW, 4, NR>(A, B, K, out);
      break;
  }
}

// rows per narrow tile with nr weight rows: at most 24 (AVX2: 12) accumulators
QI int narrow_mr(int nr) {
  const int budget = W == 8 ? 12 : 24;
  return static_cast<int>(imax(1, imin(kMaxMR, budget / nr)));
}

template <class TA, class TW>
void dot_tile(int nr, int mr, const TA* const* A, const TW* const* B, int64_t K, float* out) {
  switch (nr) {
    case 12: dot_mr<TA, TW, 12>(mr, A, B, K, out); break;
    case 8: dot_mr<TA, TW, 8>(mr, A, B, K, out); break;
    case 6: dot_mr<TA, TW, 6>(mr, A, B, K, out); break;
    default: dot_mr<TA, TW, 4>(mr, A, B, K, out); break;
  }
}

// The activations of the narrow tiles: the rows as they are for the bf16 pairs path and fp32 inputs, else fp32
// copies (made once per block).
template <class T>
using NarrowA = std::conditional_t<(QWEN3MOE_DP && std::is_same_v<T, bf16_t>), bf16_t, float>;

// Whether the wide path packs pairs (bf16 dot products) or fp32.
template <class T>
constexpr bool kPairs = QWEN3MOE_DP && std::is_same_v<T, bf16_t>;

template <class T>
void wide_tile(int mv, int nr_kind, const void* XP, int64_t ld, const T* const* B, int64_t K, float* out) {
  // nr_kind: 0 = gate_up (2 * kWideNC rows), 1 = down (kWideNR rows)
#if QWEN3MOE_DP
  if constexpr (kPairs<T>) {
    const uint32_t* xp = static_cast<const uint32_t*>(XP);
    if (nr_kind == 0) {
      if (mv == 1) outer_dp<1, 2 * kWideNC>(xp, ld, B, K, out);
      else outer_dp<kWideMV, 2 * kWideNC>(xp, ld, B, K, out);
    } else {
      if (mv == 1) outer_dp<1, kWideNR>(xp, ld, B, K, out);
      else outer_dp<kWideMV, kWideNR>(xp, ld, B, K, out);
    }
    return;
  } else
#endif
  {
    const float* xp = static_cast<const float*>(XP);
    if (nr_kind == 0) {
      if (mv == 1) outer_fma<T, 1, 2 * kWideNC>(xp, ld, B, K, out);
      else outer_fma<T, kWideMV, 2 * kWideNC>(xp, ld, B, K, out);
    } else {
      if (mv == 1) outer_fma<T, 1, kWideNR>(xp, ld, B, K, out);
      else outer_fma<T, kWideMV, kWideNR>(xp, ld, B, K, out);
    }
  }
}

// ------------------------------------------------------------------------------------------------ packing

// Rows rows[0..mc) (each K elements of T) into the wide layout, lanes = rows, m_pad = round_up(mc, W) lanes,
// zeros past mc: fp32 [K][m_pad], or (pairs) 32-bit words [ceil(K/2)][m_pad].
template <class T>
void pack_rows(const T* const* rows, int64_t mc, int64_t K, void* dst) {
  const int64_t m_pad = round_up(mc, W);
  if constexpr (kPairs<T>) {
#if QWEN3MOE_DP
    uint32_t* out = static_cast<uint32_t*>(dst);
    const int64_t P = (K + 1) / 2;
    for (int64_t m0 = 0; m0 < m_pad; m0 += 16) {
      for (int64_t p0 = 0; p0 < P; p0 += 16) {
        const int64_t np = imin(16, P - p0);
        const int64_t elems = imin(32, K - 2 * p0);
        const __mmask32 mk = elems >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1ull << elems) - 1);
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = m0 + i < mc ? _mm512_maskz_loadu_epi16(mk, rows[m0 + i] + 2 * p0) : _mm512_setzero_si512();
        V::transpose(r);
        for (int64_t j = 0; j < np; ++j) _mm512_storeu_si512(out + (p0 + j) * m_pad + m0, r[j]);
      }
    }
#endif
  } else {
    float* out = static_cast<float*>(dst);
    for (int64_t m0 = 0; m0 < m_pad; m0 += W) {
      for (int64_t k0 = 0; k0 < K; k0 += W) {
        const int nk = static_cast<int>(imin(W, K - k0));
        typename V::I r[W];
        for (int i = 0; i < W; ++i) {
          F v = m0 + i < mc ? (nk == W ? V::load_t(rows[m0 + i] + k0) : V::load_t_n(rows[m0 + i] + k0, nk)) : V::zero();
          r[i] = V::as_i(v);
        }
        V::transpose(r);
        for (int j = 0; j < nk; ++j) V::store_i(out + (k0 + j) * m_pad + m0, r[j]);
      }
    }
  }
}

// --------------------------------------------------------------------------------------------- gate_up

constexpr int64_t kMaxNarrowRows = 32;  // Kernels::wide_rows never exceeds this: narrow blocks stay small

struct Expert {
  int64_t hit, e, begin, M;  // index among the hit experts, expert id, first position in sorted, rows
};

QI Expert expert_of(const Problem& P, int64_t hit) {
  return {hit, P.hit_expert[hit], P.hit_begin[hit], P.hit_begin[hit + 1] - P.hit_begin[hit]};
}

QI char* align64(char* p) { return reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(p), 64)); }

// Rows per packed block of x in wide gate_up: ~256 KB of packed activations (half of L2), whole tiles.
QI int64_t wide_chunk_rows(int64_t K, bool pairs) {
  const int64_t row_bytes = pairs ? (K + 1) / 2 * 4 : K * 4;
  const int64_t step = W * kWideMV;
  return imax(step, (262144 / imax(row_bytes, 1)) / step * step);
}

template <class T, Act ACT>
void gate_up_narrow(const Problem& P, const Expert& ex, int64_t c0, int64_t c1, char* scratch) {
  using TA = NarrowA<T>;
  const int64_t H = P.H, I = P.I, M = ex.M, cols = c1 - c0;
  const T* x = static_cast<const T*>(P.x);
  const T* w = static_cast<const T*>(P.w_gate_up) + ex.e * 2 * I * H;
  float* gbuf = reinterpret_cast<float*>(scratch);  // [M][cols] gate, then up: fp32 dot products
  float* ubuf = gbuf + M * cols;
  float* xf = reinterpret_cast<float*>(align64(reinterpret_cast<char*>(ubuf + M * cols)));
  const TA* A[kMaxNarrowRows];
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + (P.sorted[ex.begin + m] / P.k) * P.x_stride;
    if constexpr (std::is_same_v<TA, T>) {
      A[m] = row;
    } else {  // fp32 copies of 16-bit rows for the FMA kernels (exact)
      float* dst = xf + m * H;
      for (int64_t c = 0; c < H; ++c) dst[c] = to_f32(row[c]);
      A[m] = dst;
    }
  }
  const int nc = narrow_nc(M), mr_max = narrow_mr(2 * nc);
  float tile[kMaxMR * kMaxNarrowNR];
  const T* B[kMaxNarrowNR];
  for (int64_t c = c0; c < c1; c += nc) {
    const int64_t n = imin(nc, c1 - c);
    for (int j = 0; j < nc; ++j) {  // past the block's end the last column again (its results are dropped)
      const int64_t col = c + imin(j, n - 1);
      B[j] = w + col * H;
      B[nc + j] = w + (I + col) * H;
    }
    for (int64_t m0 = 0; m0 < M; m0 += mr_max) {
      const int mr = static_cast<int>(imin(mr_max, M - m0));
      dot_tile<TA, T>(2 * nc, mr, A + m0, B, H, tile);
      for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < n; ++j) {
          gbuf[(m0 + i) * cols + (c - c0) + j] = tile[i * 2 * nc + j];
          ubuf[(m0 + i) * cols + (c - c0) + j] = tile[i * 2 * nc + nc + j];
        }
    }
  }
  T* h_rows = static_cast<T*>(P.h_rows);
  T* gu = static_cast<T*>(P.gate_up);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t s = P.sorted[ex.begin + m];
    act_mul_row<T, ACT>(gbuf + m * cols, ubuf + m * cols, cols, h_rows + s * I + c0,
                      gu ? gu + s * 2 * I + c0 : nullptr, gu ? gu + s * 2 * I + I + c0 : nullptr);
  }
}

template <class T, Act ACT>
void gate_up_wide(const Problem& P, const Expert& ex, int64_t c0, int64_t c1, char* scratch) {
  constexpr bool pairs = kPairs<T>;
  constexpr int NR = 2 * kWideNC;
  const int64_t H = P.H, I = P.I, M = ex.M, m_pad_e = round_up(M, W);
  const T* x = static_cast<const T*>(P.x);
  const T* w = static_cast<const T*>(P.w_gate_up) + ex.e * 2 * I * H;
  char* hp = static_cast<char*>(P.hp) + P.hit_hp[ex.hit];
  T* h_rows = static_cast<T*>(P.h_rows);
  T* gu = static_cast<T*>(P.gate_up);
  const int64_t chunk = wide_chunk_rows(H, pairs);
  const T** rows = reinterpret_cast<const T**>(scratch);
  void* XP = align64(scratch + chunk * sizeof(const T*));
  alignas(64) float tile[NR * kWideMV * W];
  alignas(64) float hs[W], gs[W], us[W];
  const T* B[NR];
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = imin(chunk, M - m0), nv = round_up(mc, W) / W;
    for (int64_t m = 0; m < mc; ++m) rows[m] = x + (P.sorted[ex.begin + m0 + m] / P.k) * P.x_stride;
    pack_rows<T>(rows, mc, H, XP);
    for (int64_t c = c0; c < c1; c += kWideNC) {
      const int64_t n = imin(kWideNC, c1 - c);
      for (int j = 0; j < kWideNC; ++j) {
        const int64_t col = c + imin(j, n - 1);
        B[j] = w + col * H;
        B[kWideNC + j] = w + (I + col) * H;
      }
      for (int64_t v0 = 0; v0 < nv; v0 += kWideMV) {
        const int mv = static_cast<int>(imin(kWideMV, nv - v0));
        const int64_t ld = mv * W;
        const void* xp = pairs ? static_cast<const void*>(static_cast<const uint32_t*>(XP) + v0 * W)
                               : static_cast<const void*>(static_cast<const float*>(XP) + v0 * W);
        wide_tile<T>(mv, 0, xp, nv * W, B, H, tile);
        for (int v = 0; v < mv; ++v) {
          const int64_t r0 = m0 + (v0 + v) * W;  // the expert row of lane 0
          F hv[kWideNC];
          for (int64_t j = 0; j < n; ++j) {
            F g = V::load(tile + j * ld + v * W), u = V::load(tile + (kWideNC + j) * ld + v * W);
            hv[j] = V::round_t(V::mul(act<ACT>(g), u), static_cast<T*>(nullptr));
            if (P.save) {
              const int64_t valid = imin(W, M - r0);
              V::store(hs, hv[j]);
              V::store(gs, g);
              V::store(us, u);
              for (int64_t l = 0; l < valid; ++l) {
                const int64_t s = P.sorted[ex.begin + r0 + l];
                h_rows[s * I + c + j] = from_f32<T>(hs[l]);
                gu[s * 2 * I + c + j] = from_f32<T>(gs[l]);
                gu[s * 2 * I + I + c + j] = from_f32<T>(us[l]);
              }
            }
          }
          if constexpr (pairs) {
#if QWEN3MOE_DP
            uint32_t* hpw = reinterpret_cast<uint32_t*>(hp);
            for (int64_t j = 0; j < n; j += 2) {  // c is even: (c + j, c + j + 1) is one pair word
              __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(hv[j]), 16);
              __m512i hi = j + 1 < n ? _mm512_and_si512(_mm512_castps_si512(hv[j + 1]), _mm512_set1_epi32(-65536))
                                     : _mm512_setzero_si512();
              _mm512_storeu_si512(hpw + ((c + j) / 2) * m_pad_e + r0, _mm512_or_si512(lo, hi));
            }
#endif
          } else {
            float* hpf = reinterpret_cast<float*>(hp);
            for (int64_t j = 0; j < n; ++j) V::store(hpf + (c + j) * m_pad_e + r0, hv[j]);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ down

template <class T>
void down_block(const Problem& P, int64_t h0, int64_t h1, char* scratch) {
  using TA = NarrowA<T>;
  constexpr bool pairs = kPairs<T>;
  const int64_t H = P.H, I = P.I, hb = h1 - h0, k = P.k;
  float* y = reinterpret_cast<float*>(scratch);  // [S][hb]: each slot's weighted fp32 product
  float* hf = reinterpret_cast<float*>(align64(reinterpret_cast<char*>(y + P.S * hb)));
  const T* wd = static_cast<const T*>(P.w_down);
  const T* h_rows = static_cast<const T*>(P.h_rows);
  for (int64_t hit = 0; hit < P.n_hit; ++hit) {
    const Expert ex = expert_of(P, hit);
    const T* w = wd + ex.e * H * I;
    if (!P.hit_wide[hit]) {
      const TA* A[kMaxNarrowRows];
      for (int64_t m = 0; m < ex.M; ++m) {
        const T* row = h_rows + P.sorted[ex.begin + m] * I;
        if constexpr (std::is_same_v<TA, T>) {
          A[m] = row;
        } else {
          float* dst = hf + m * I;
          for (int64_t c = 0; c < I; ++c) dst[c] = to_f32(row[c]);
          A[m] = dst;
        }
      }
      const int nr = narrow_nr(ex.M), mr_max = narrow_mr(nr);
      float tile[kMaxMR * kMaxNarrowNR];
      const T* B[kMaxNarrowNR];
      for (int64_t n0 = h0; n0 < h1; n0 += nr) {
        const int64_t nn = imin(nr, h1 - n0);
        for (int j = 0; j < nr; ++j) B[j] = w + (n0 + imin(j, nn - 1)) * I;
        for (int64_t m0 = 0; m0 < ex.M; m0 += mr_max) {
          const int mr = static_cast<int>(imin(mr_max, ex.M - m0));
          dot_tile<TA, T>(nr, mr, A + m0, B, I, tile);
          for (int i = 0; i < mr; ++i) {
            const int64_t s = P.sorted[ex.begin + m0 + i];
            const float r = P.rw[s];
            for (int64_t j = 0; j < nn; ++j) y[s * hb + (n0 - h0) + j] = tile[i * nr + j] * r;
          }
        }
      }
    } else {
      const char* hp = static_cast<const char*>(P.hp) + P.hit_hp[hit];
      const int64_t m_pad_e = round_up(ex.M, W), nv = m_pad_e / W;
      const T* B[kWideNR];
      alignas(64) float tile[kWideNR * kWideMV * W];
      int64_t sl[kWideMV * W];
      float rl[kWideMV * W];
      for (int64_t v0 = 0; v0 < nv; v0 += kWideMV) {
        const int mv = static_cast<int>(imin(kWideMV, nv - v0));
        const int64_t lanes = mv * W, r0 = v0 * W, valid = imin(lanes, ex.M - r0);
        for (int64_t l = 0; l < valid; ++l) {
          sl[l] = P.sorted[ex.begin + r0 + l];
          rl[l] = P.rw[sl[l]];
        }
        const void* xp = pairs ? static_cast<const void*>(reinterpret_cast<const uint32_t*>(hp) + r0)
                               : static_cast<const void*>(reinterpret_cast<const float*>(hp) + r0);
        for (int64_t n0 = h0; n0 < h1; n0 += kWideNR) {
          const int64_t nn = imin(kWideNR, h1 - n0);
          for (int j = 0; j < kWideNR; ++j) B[j] = w + (n0 + imin(j, nn - 1)) * I;
          wide_tile<T>(mv, 1, xp, m_pad_e, B, I, tile);
          for (int64_t l = 0; l < valid; ++l) {
            float* yr = y + sl[l] * hb + (n0 - h0);
            for (int64_t j = 0; j < nn; ++j) yr[j] = tile[j * lanes + l] * rl[l];
          }
        }
      }
    }
  }
  // the k slots of each token in the order j = 0..k-1, fp32, one rounding
  T* out = static_cast<T*>(P.out);
  for (int64_t t = 0; t < P.T; ++t) {
    const float* yt = y + t * k * hb;
    T* ot = out + t * H + h0;
    int64_t c = 0;
    for (; c + W <= hb; c += W) {
      F acc = V::load(yt + c);
      for (int64_t j = 1; j < k; ++j) acc = V::add(acc, V::load(yt + j * hb + c));
      V::store_t(ot + c, acc);
    }
    if (c < hb) {
      const int r = static_cast<int>(hb - c);
      F acc = V::load_n(yt + c, r);
      for (int64_t j = 1; j < k; ++j) acc = V::add(acc, V::load_n(yt + j * hb + c, r));
      V::store_t_n(ot + c, acc, r);
    }
  }
}

// ------------------------------------------------------------------------------------------ the table

template <class T>
void gate_up_t(const Problem& P, int64_t hit, int64_t c0, int64_t c1, char* scratch) {
  const Expert ex = expert_of(P, hit);
  const bool wide = P.hit_wide[hit] != 0;
  switch (P.act) {
    case Act::silu:
      wide ? gate_up_wide<T, Act::silu>(P, ex, c0, c1, scratch) : gate_up_narrow<T, Act::silu>(P, ex, c0, c1, scratch);
      break;
    case Act::gelu:
      wide ? gate_up_wide<T, Act::gelu>(P, ex, c0, c1, scratch) : gate_up_narrow<T, Act::gelu>(P, ex, c0, c1, scratch);
      break;
    case Act::gelu_tanh:
      wide ? gate_up_wide<T, Act::gelu_tanh>(P, ex, c0, c1, scratch)
           : gate_up_narrow<T, Act::gelu_tanh>(P, ex, c0, c1, scratch);
      break;
    default:
      wide ? gate_up_wide<T, Act::relu>(P, ex, c0, c1, scratch) : gate_up_narrow<T, Act::relu>(P, ex, c0, c1, scratch);
      break;
  }
}

void gate_up_entry(const Problem& P, int64_t hit, int64_t c0, int64_t c1, void* scratch) {
  char* s = align64(static_cast<char*>(scratch));
  switch (P.dtype) {
    case DType::f32: gate_up_t<float>(P, hit, c0, c1, s); break;
    case DType::f16: gate_up_t<f16_t>(P, hit, c0, c1, s); break;
    default: gate_up_t<bf16_t>(P, hit, c0, c1, s); break;
  }
}

void down_entry(const Problem& P, int64_t h0, int64_t h1, void* scratch) {
  char* s = align64(static_cast<char*>(scratch));
  switch (P.dtype) {
    case DType::f32: down_block<float>(P, h0, h1, s); break;
    case DType::f16: down_block<f16_t>(P, h0, h1, s); break;
    default: down_block<bf16_t>(P, h0, h1, s); break;
  }
}

int64_t scratch_bytes(const Problem& P, int64_t cols, int64_t hb) {
  const bool pairs = QWEN3MOE_DP && P.dtype == DType::bf16;
  const int64_t narrow = 2 * kMaxNarrowRows * cols * 4 + 64 + kMaxNarrowRows * P.H * 4;
  const int64_t chunk = wide_chunk_rows(P.H, pairs);
  const int64_t wide = chunk * 8 + 64 + chunk * (pairs ? (P.H + 1) / 2 * 4 : P.H * 4);
  const int64_t down = P.S * hb * 4 + 64 + kMaxNarrowRows * P.I * 4;
  return imax(imax(narrow, wide), down) + 128;
}

}  // namespace

const Kernels& QWEN3MOE_KERNELS_FN() {
  // wide_rows (fp32, fp16, bf16): the row count from which the row-lanes kernels win, measured on the ISA's
  // machine (docs/ops/grouped_swiglu.md); at most kMaxNarrowRows
  static const Kernels table = {
      QWEN3MOE_ISA_ENUM, W, QWEN3MOE_DP != 0, 12, {8, 8, 8}, &scratch_bytes, &gate_up_entry, &down_entry,
  };
  return table;
}

}  // namespace qwen3moe::experts
