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
// its routing weight, rounds it to x's dtype (as the Triton down epilogue) and the k slots of a token are summed in
// fp32 in the order j = 0..k-1 within the same block.
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
#define QWEN3MOE_KERNELS_FN kernels_avx512_bf16
#elif defined(QWEN3MOE_ISA_AVX512)
#define QWEN3MOE_V512 1
#define QWEN3MOE_DP 0
#define QWEN3MOE_KERNELS_FN kernels_avx512
#elif defined(QWEN3MOE_ISA_AVX2)
#define QWEN3MOE_V256 1
#define QWEN3MOE_DP 0
#define QWEN3MOE_KERNELS_FN kernels_avx2
#elif defined(QWEN3MOE_ISA_GENERIC)
#define QWEN3MOE_DP 0
#define QWEN3MOE_KERNELS_FN kernels_generic
#else
#error "define one QWEN3MOE_ISA_* before including grouped_swiglu_cpu_impl.h"
#endif

namespace qwen3moe::experts {
namespace {

#define QI QWEN3MOE_LOCAL  // every helper below: inlined, so no copy of it outlives this translation unit

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
  // two roundings: this file is built without -mfma, where fmaf is a libm call per multiply-add (399 call sites,
  // 6-9x slower than the torch implementation); -ffp-contract=off keeps the compiler from fusing it back
  static QI F fma(F a, F b, F c) { return a * b + c; }
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

// Narrow kernels stream one weight row at a time (rows of a block are adjacent in memory, so the weights are read
// as one sequential stream, as a plain sum reads memory) against MR activation rows, with two accumulators per row
// and an L2 prefetch kPrefetch bytes ahead: with several activation rows the out-of-order window alone keeps too few
// lines in flight (measured 14-15 GB/s for 4 rows without it, 23 GB/s with it, against 23 GB/s for a plain sum).
constexpr int64_t kPrefetch = 8192;

template <class TW>
QI void prefetch_l2(const TW* p, int64_t bytes) {
#if !defined(QWEN3MOE_ISA_GENERIC)
  const char* c = reinterpret_cast<const char*>(p) + kPrefetch;
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
#else
  (void)p, (void)bytes;
#endif
}

// Narrow, fp32 FMA: out[b][m] = sum_k A[m][k] * B[b][k] for MR fp32 rows A and NB (1 or 2) adjacent weight rows B
// of TW, two accumulators per output (alternate vectors of k). With two weight rows each activation vector loaded
// serves both: 0.67 loads per FMA at 6 rows instead of 1.2 (with six or more rows a single weight row is bound by
// the loads, not by memory). Each output's arithmetic is the same whatever NB and MR: NB and the row chunks may
// follow block boundaries without changing a bit.
template <class TW, int MR, int NB>
void dot_row_fma(const float* const* A, const TW* const* B, int64_t K, float* const* out) {
  F acc[MR][NB][2];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b][0] = acc[m][b][1] = V::zero();
  int64_t kk = 0;
  for (; kk + 2 * W <= K; kk += 2 * W) {
    F w0[NB], w1[NB];
    for (int b = 0; b < NB; ++b) {
      if (MR > 2) prefetch_l2(B[b] + kk, 2 * W * static_cast<int64_t>(sizeof(TW)));
      w0[b] = V::load_t(B[b] + kk), w1[b] = V::load_t(B[b] + kk + W);
    }
    for (int m = 0; m < MR; ++m) {
      F a0 = V::load(A[m] + kk), a1 = V::load(A[m] + kk + W);
      for (int b = 0; b < NB; ++b) {
        acc[m][b][0] = V::fma(a0, w0[b], acc[m][b][0]);
        acc[m][b][1] = V::fma(a1, w1[b], acc[m][b][1]);
      }
    }
  }
  if (kk + W <= K) {
    for (int m = 0; m < MR; ++m) {
      F a0 = V::load(A[m] + kk);
      for (int b = 0; b < NB; ++b) acc[m][b][0] = V::fma(a0, V::load_t(B[b] + kk), acc[m][b][0]);
    }
    kk += W;
  }
  if (kk < K) {
    const int r = static_cast<int>(K - kk);
    for (int m = 0; m < MR; ++m) {
      F a1 = V::load_n(A[m] + kk, r);
      for (int b = 0; b < NB; ++b) acc[m][b][1] = V::fma(a1, V::load_t_n(B[b] + kk, r), acc[m][b][1]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MR; ++m) out[b][m] = V::hsum(V::add(acc[m][b][0], acc[m][b][1]));
}

// Cache lines a wide tile prefetches into L2 while it computes, one per k step: the next tile's weight rows (and
// the next expert's packed h), so their first reads do not wait on memory. Up to two byte ranges.
struct Prefetch {
  const char* a = nullptr;
  int64_t na = 0;  // lines of range a
  const char* b = nullptr;
  int64_t nb = 0;
  QI void at(int64_t i) const {
#if !defined(QWEN3MOE_ISA_GENERIC)
    if (i < na) _mm_prefetch(a + i * 64, _MM_HINT_T1);
    else if (i - na < nb) _mm_prefetch(b + (i - na) * 64, _MM_HINT_T1);
#else
    (void)i;
#endif
  }
  // lines [first, first + count) of this plan, as a plan of their own
  QI Prefetch slice(int64_t first, int64_t count) const {
    Prefetch p;
    const int64_t a0 = imin(first, na), a1 = imin(first + count, na);
    p.a = a + a0 * 64, p.na = a1 - a0;
    const int64_t b0 = imax(first - na, 0), b1 = imin(imax(first + count - na, 0), nb);
    p.b = b + b0 * 64, p.nb = imax(b1 - b0, 0);
    return p;
  }
};

QI int64_t lines(int64_t bytes) { return (bytes + 63) / 64; }

// Wide, fp32 FMA: out[n][m] = sum_k XP[k][m] * B[n][k] for MV vectors of rows packed [K][ld] (fp32) and NR weight
// rows; out is [NR][MV * W].
template <class TW, int MV, int NR>
void outer_fma(const float* XP, int64_t ld, const TW* const* B, int64_t K, float* out, const Prefetch& pf) {
  F acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = V::zero();
  for (int64_t kk = 0; kk < K; ++kk) {
    pf.at(kk);
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
// Narrow, bf16 pairs: dot_row_fma with vdpbf16ps on 32 k at a time.
template <int MR, int NB>
void dot_row_dp(const bf16_t* const* A, const bf16_t* const* B, int64_t K, float* const* out) {
  __m512 acc[MR][NB][2];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b][0] = acc[m][b][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 64 <= K; kk += 64) {
    __m512bh w0[NB], w1[NB];
    for (int b = 0; b < NB; ++b) {
      if (MR > 2) prefetch_l2(B[b] + kk, 128);
      w0[b] = (__m512bh)_mm512_loadu_si512(B[b] + kk), w1[b] = (__m512bh)_mm512_loadu_si512(B[b] + kk + 32);
    }
    for (int m = 0; m < MR; ++m) {
      __m512bh a0 = (__m512bh)_mm512_loadu_si512(A[m] + kk), a1 = (__m512bh)_mm512_loadu_si512(A[m] + kk + 32);
      for (int b = 0; b < NB; ++b) {
        acc[m][b][0] = _mm512_dpbf16_ps(acc[m][b][0], a0, w0[b]);
        acc[m][b][1] = _mm512_dpbf16_ps(acc[m][b][1], a1, w1[b]);
      }
    }
  }
  if (kk + 32 <= K) {
    for (int m = 0; m < MR; ++m) {
      __m512bh a0 = (__m512bh)_mm512_loadu_si512(A[m] + kk);
      for (int b = 0; b < NB; ++b)
        acc[m][b][0] = _mm512_dpbf16_ps(acc[m][b][0], a0, (__m512bh)_mm512_loadu_si512(B[b] + kk));
    }
    kk += 32;
  }
  if (kk < K) {
    const __mmask32 mk = static_cast<__mmask32>((1ull << (K - kk)) - 1);
    for (int m = 0; m < MR; ++m) {
      __m512bh a1 = (__m512bh)_mm512_maskz_loadu_epi16(mk, A[m] + kk);
      for (int b = 0; b < NB; ++b)
        acc[m][b][1] = _mm512_dpbf16_ps(acc[m][b][1], a1, (__m512bh)_mm512_maskz_loadu_epi16(mk, B[b] + kk));
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MR; ++m) out[b][m] = V::hsum(_mm512_add_ps(acc[m][b][0], acc[m][b][1]));
}

// Wide, bf16 pairs: XP holds 32-bit (x[2p], x[2p+1]) words [ceil(K/2)][ld]; each weight pair is broadcast.
template <int MV, int NR>
void outer_dp(const uint32_t* XP, int64_t ld, const bf16_t* const* B, int64_t K, float* out, const Prefetch& pf) {
  __m512 acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_setzero_ps();
  const int64_t P = K / 2;
  for (int64_t p = 0; p < P; ++p) {
    pf.at(p);
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
// Wide tiles: MV vectors of rows (lanes) by NR weight rows, MV * NR accumulators. Measured on Zen 4 (vdpbf16ps,
// operands in L2, CPU time): 1x8, 2x8, 3x8 and 4x6 tiles run at 98-100% of the dot-product peak; 2x12 at 88% and
// 1x12 at 63% (12 row pointers no longer fit the general registers, the loop spills them). So 8 weight rows (gate_up:
// 4 columns of gate and 4 of up) and up to 3 vectors: 24 accumulators of AVX-512's 32 registers. AVX2 has 16: 2x6.
#if defined(QWEN3MOE_V512)
constexpr int kWideMV = 3;               // vectors of rows per tile
constexpr int kWideNR = 8;               // weight rows per tile
#elif defined(QWEN3MOE_V256)
constexpr int kWideMV = 2;
constexpr int kWideNR = 6;
#else
constexpr int kWideMV = 1;
constexpr int kWideNR = 4;
#endif
constexpr int kWideNC = kWideNR / 2;     // gate_up: columns per tile (gate rows, then up rows)
#if defined(QWEN3MOE_V512)
constexpr int kMaxMR = 8;                // narrow: activation rows per pass over one weight row (2 accumulators each)
constexpr int kMaxMR2 = 6;               // ... over two weight rows (4 accumulators each: 24)
#else
constexpr int kMaxMR = 4;
constexpr int kMaxMR2 = 2;
#endif

// From how many rows an expert takes the wide kernels, and how many rows past a whole vector of lanes the narrow
// kernels take instead of a padded vector, per dtype (fp32, fp16, bf16). A narrow row reloads its activation vector
// for every weight row (~1.1 loads per dot product), and past ~6 rows of 4 KB the activations no longer stay in L1;
// a wide vector of 16 rows costs K/2 (pairs) or K (FMA) dot products per weight row whatever its padding. Measured on
// whole blocks (Zen 4, 1 thread, CPU time, T=64 and 512, docs/ops/grouped_swiglu.md): bf16 16/8 against 12/6, 16/6,
// 12/8 and 20/8 all within 1.5%; fp32 16/8 against 8/4 3.6% faster at T=512.
#if defined(QWEN3MOE_V512)
constexpr int64_t kWideRows[3] = {16, 16, 16};
constexpr int64_t kNarrowRemainder[3] = {8, 8, 8};
#elif defined(QWEN3MOE_V256)
constexpr int64_t kWideRows[3] = {8, 8, 8};
constexpr int64_t kNarrowRemainder[3] = {4, 4, 4};
#else
constexpr int64_t kWideRows[3] = {16, 16, 16};
constexpr int64_t kNarrowRemainder[3] = {0, 0, 0};
#endif

// NB (1 or 2) weight rows against mr activation rows: 1..kMaxMR for one weight row, 1..kMaxMR2 for two.
template <class TA, class TW, int NB>
void dot_row(int mr, const TA* const* A, const TW* const* B, int64_t K, float* const* out) {
#define QWEN3MOE_DOT_CASES(KERNEL)                         \
  switch (mr) {                                              \
    case 1: KERNEL(1); break;                                \
    case 2: KERNEL(2); break;                                \
    case 3: KERNEL(3); break;                                \
    case 4: KERNEL(4); break;                                \
    case 5: if constexpr (kMaxMR >= 5) KERNEL(5); break;     \
    case 6: if constexpr (kMaxMR >= 6) KERNEL(6); break;     \
    case 7: if constexpr (kMaxMR >= 7 && NB == 1) KERNEL(7); break; \
    default: if constexpr (kMaxMR >= 8 && NB == 1) KERNEL(8); break; \
  }
#if QWEN3MOE_DP
  if constexpr (std::is_same_v<TA, bf16_t>) {
#define QWEN3MOE_DP_KERNEL(R) dot_row_dp<R, NB>(A, B, K, out)
    QWEN3MOE_DOT_CASES(QWEN3MOE_DP_KERNEL)
#undef QWEN3MOE_DP_KERNEL
    return;
  } else
#endif
  {
#define QWEN3MOE_FMA_KERNEL(R) dot_row_fma<TW, R, NB>(A, B, K, out)
    QWEN3MOE_DOT_CASES(QWEN3MOE_FMA_KERNEL)
#undef QWEN3MOE_FMA_KERNEL
  }
#undef QWEN3MOE_DOT_CASES
}

// The dot products of M activation rows with weight rows b0 .. b0 + n (adjacent, ld elements apart): out[r * M + m]
// for row r. Two weight rows at a time once there are 3 or more activation rows (compute starts to matter; with
// fewer, one row at a time keeps the weights a single sequential stream), in chunks of activation rows; each row is
// read from memory once, again from L1 for later chunks.
template <class TA, class TW>
void dot_rows(int64_t M, const TA* const* A, const TW* b0, int64_t n, int64_t ld, int64_t K, float* out) {
  int64_t r = 0;
  if (M >= 3) {
    for (; r + 2 <= n; r += 2) {
      const TW* B[2] = {b0 + r * ld, b0 + (r + 1) * ld};
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMR2) {
        float* o[2] = {out + r * M + m0, out + (r + 1) * M + m0};
        dot_row<TA, TW, 2>(static_cast<int>(imin(kMaxMR2, M - m0)), A + m0, B, K, o);
      }
    }
  }
  for (; r < n; ++r) {
    const TW* B[1] = {b0 + r * ld};
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
      float* o[1] = {out + r * M + m0};
      dot_row<TA, TW, 1>(static_cast<int>(imin(kMaxMR, M - m0)), A + m0, B, K, o);
    }
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
void wide_tile(int mv, const void* XP, int64_t ld, const T* const* B, int64_t K, float* out, const Prefetch& pf) {
#if QWEN3MOE_DP
  if constexpr (kPairs<T>) {
    const uint32_t* xp = static_cast<const uint32_t*>(XP);
    switch (mv) {
      case 1: outer_dp<1, kWideNR>(xp, ld, B, K, out, pf); break;
      case 2: outer_dp<2, kWideNR>(xp, ld, B, K, out, pf); break;
      default: outer_dp<kWideMV, kWideNR>(xp, ld, B, K, out, pf); break;
    }
    return;
  } else
#endif
  {
    const float* xp = static_cast<const float*>(XP);
    switch (mv) {
      case 1: outer_fma<T, 1, kWideNR>(xp, ld, B, K, out, pf); break;
      case 2:
        if constexpr (kWideMV >= 2) outer_fma<T, 2, kWideNR>(xp, ld, B, K, out, pf);
        break;
      default: outer_fma<T, kWideMV, kWideNR>(xp, ld, B, K, out, pf); break;
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

// The activation rows of an expert's narrow rows [r0, M) for the narrow kernels: src rows (x by token, or h by
// slot), or their fp32 copies in scratch where the kernel computes in fp32 (exact). Returns the scratch left.
template <class T>
char* narrow_rows(const Problem& P, const Expert& ex, int64_t r0, const T* src, int64_t K, bool by_token,
                  const NarrowA<T>** A, char* scratch) {
  using TA = NarrowA<T>;
  float* copies = reinterpret_cast<float*>(align64(scratch));
  for (int64_t j = 0; j < ex.M - r0; ++j) {
    const int64_t s = P.sorted[ex.begin + r0 + j];
    const T* row = by_token ? src + (s / P.k) * P.x_stride : src + s * K;
    if constexpr (std::is_same_v<TA, T>) {
      A[j] = row;
    } else {
      float* dst = copies + j * K;
      for (int64_t c = 0; c < K; ++c) dst[c] = to_f32(row[c]);
      A[j] = dst;
    }
  }
  return std::is_same_v<TA, T> ? scratch : reinterpret_cast<char*>(copies + (ex.M - r0) * K);
}

// gate and up dot products of n narrow rows for columns [ca, cb) of a block starting at c0 (cols wide): the gate
// rows, then the up rows, each a sequential stream of the weights.
template <class T>
void narrow_gate_up_cols(int64_t n, const NarrowA<T>* const* A, const T* w, int64_t H, int64_t I, int64_t c0,
                         int64_t ca, int64_t cb, int64_t cols, float* gbuf, float* ubuf) {
  constexpr int64_t kRows = 16;  // weight rows per call
  float dots[kRows * kMaxNarrowRows];
  for (int half = 0; half < 2; ++half) {
    float* buf = half == 0 ? gbuf : ubuf;
    for (int64_t c = ca; c < cb; c += kRows) {
      const int64_t nr = imin(kRows, cb - c);
      dot_rows<NarrowA<T>, T>(n, A, w + (half * I + c) * H, nr, H, H, dots);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t m = 0; m < n; ++m) buf[m * cols + (c - c0) + r] = dots[r * n + m];
    }
  }
}

// h = act(gate) * up of the narrow rows [r0, M), columns [c0, c0 + cols), into h_rows (and gate_up when saved).
template <class T, Act ACT>
void narrow_epilogue(const Problem& P, const Expert& ex, int64_t r0, int64_t c0, int64_t cols, const float* gbuf,
                     const float* ubuf) {
  T* h_rows = static_cast<T*>(P.h_rows);
  T* gu = static_cast<T*>(P.gate_up);
  const int64_t I = P.I;
  for (int64_t m = 0; m < ex.M - r0; ++m) {
    const int64_t s = P.sorted[ex.begin + r0 + m];
    act_mul_row<T, ACT>(gbuf + m * cols, ubuf + m * cols, cols, h_rows + s * I + c0,
                        gu ? gu + s * 2 * I + c0 : nullptr, gu ? gu + s * 2 * I + I + c0 : nullptr);
  }
}

// gate_up of an expert's columns [c0, c1): rows [0, mw) by the wide kernels (x packed with the rows on the lanes,
// h packed the same way for down), rows [mw, M) by the narrow ones, on the same weight rows while they are in L1.
template <class T, Act ACT>
void gate_up_block(const Problem& P, const Expert& ex, int64_t c0, int64_t c1, char* scratch) {
  constexpr bool pairs = kPairs<T>;
  constexpr int NR = kWideNR;
  const int64_t H = P.H, I = P.I, M = ex.M, cols = c1 - c0;
  const int64_t mw = P.hit_wide_rows[ex.hit], m_pad_e = round_up(mw, W), nn = M - mw;
  const T* x = static_cast<const T*>(P.x);
  const T* w = static_cast<const T*>(P.w_gate_up) + ex.e * 2 * I * H;
  // scratch: the narrow rows' gate/up products [nn][cols] and activation rows, then the packed x
  float* gbuf = reinterpret_cast<float*>(align64(scratch));
  float* ubuf = gbuf + nn * cols;
  const NarrowA<T>* A[kMaxNarrowRows];
  char* free_scratch = narrow_rows<T>(P, ex, mw, x, H, true, A, reinterpret_cast<char*>(ubuf + nn * cols));
  if (mw == 0) {
    narrow_gate_up_cols<T>(nn, A, w, H, I, c0, c0, c1, cols, gbuf, ubuf);
    narrow_epilogue<T, ACT>(P, ex, mw, c0, cols, gbuf, ubuf);
    return;
  }
  char* hp = static_cast<char*>(P.hp) + P.hit_hp[ex.hit];
  T* h_rows = static_cast<T*>(P.h_rows);
  T* gu = static_cast<T*>(P.gate_up);
  const int64_t chunk = wide_chunk_rows(H, pairs);
  const T** rows = reinterpret_cast<const T**>(align64(free_scratch));
  void* XP = align64(reinterpret_cast<char*>(rows + chunk));
  alignas(64) float tile[NR * kWideMV * W];
  alignas(64) float hs[W], gs[W], us[W];
  const T* B[NR];
  for (int64_t m0 = 0; m0 < mw; m0 += chunk) {
    const int64_t mc = imin(chunk, mw - m0), nv = round_up(mc, W) / W;
    for (int64_t m = 0; m < mc; ++m) rows[m] = x + (P.sorted[ex.begin + m0 + m] / P.k) * P.x_stride;
    pack_rows<T>(rows, mc, H, XP);
    for (int64_t c = c0; c < c1; c += kWideNC) {
      const int64_t n = imin(kWideNC, c1 - c);
      for (int j = 0; j < kWideNC; ++j) {  // past the block's end the last column again (its results are dropped)
        const int64_t col = c + imin(j, n - 1);
        B[j] = w + col * H;
        B[kWideNC + j] = w + (I + col) * H;
      }
      for (int64_t v0 = 0; v0 < nv; v0 += kWideMV) {
        const int mv = static_cast<int>(imin(kWideMV, nv - v0));
        const int64_t ld = mv * W;
        const void* xp = pairs ? static_cast<const void*>(static_cast<const uint32_t*>(XP) + v0 * W)
                               : static_cast<const void*>(static_cast<const float*>(XP) + v0 * W);
        Prefetch pf;  // the next column tile's gate and up rows, while the first row vectors compute
        if (v0 == 0 && m0 == 0 && c + kWideNC < c1) {
          const int64_t next = imin(kWideNC, c1 - c - kWideNC) * H * static_cast<int64_t>(sizeof(T));
          pf.a = reinterpret_cast<const char*>(w + (c + kWideNC) * H), pf.na = lines(next);
          pf.b = reinterpret_cast<const char*>(w + (I + c + kWideNC) * H), pf.nb = lines(next);
        }
        wide_tile<T>(mv, xp, nv * W, B, H, tile, pf);
        for (int v = 0; v < mv; ++v) {
          const int64_t r0 = m0 + (v0 + v) * W;  // the expert row of lane 0
          F hv[kWideNC];
          for (int64_t j = 0; j < n; ++j) {
            F g = V::load(tile + j * ld + v * W), u = V::load(tile + (kWideNC + j) * ld + v * W);
            hv[j] = V::round_t(V::mul(act<ACT>(g), u), static_cast<T*>(nullptr));
            if (P.save) {
              const int64_t valid = imin(W, mw - r0);
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
      if (m0 == 0 && nn > 0) narrow_gate_up_cols<T>(nn, A, w, H, I, c0, c, c + n, cols, gbuf, ubuf);
    }
  }
  if (nn > 0) narrow_epilogue<T, ACT>(P, ex, mw, c0, cols, gbuf, ubuf);
}

// ------------------------------------------------------------------------------------------------ down

template <class T>
void down_block(const Problem& P, int64_t h0, int64_t h1, char* scratch) {
  constexpr bool pairs = kPairs<T>;
  const int64_t H = P.H, I = P.I, hb = h1 - h0, k = P.k;
  float* y = reinterpret_cast<float*>(align64(scratch));  // [S][hb]: each slot's weighted fp32 product
  char* free_scratch = reinterpret_cast<char*>(y + P.S * hb);
  const T* wd = static_cast<const T*>(P.w_down);
  const T* h_rows = static_cast<const T*>(P.h_rows);
  for (int64_t hit = 0; hit < P.n_hit; ++hit) {
    const Expert ex = expert_of(P, hit);
    const T* w = wd + ex.e * H * I;
    const int64_t mw = P.hit_wide_rows[hit];
    if (mw > 0) {  // rows [0, mw): h packed with the rows on the lanes
      const char* hp = static_cast<const char*>(P.hp) + P.hit_hp[hit];
      const int64_t m_pad_e = round_up(mw, W), nv = m_pad_e / W;
      // the tiles of this expert prefetch the next expert's rows of this block and its packed h (its rows are
      // short, 2I bytes: one block is many short streams the hardware prefetcher would find late)
      Prefetch next;
      if (hit + 1 < P.n_hit) {
        next.a = reinterpret_cast<const char*>(wd + P.hit_expert[hit + 1] * H * I + h0 * I);
        next.na = lines(hb * I * static_cast<int64_t>(sizeof(T)));
        const int64_t mw_next = P.hit_wide_rows[hit + 1];
        next.b = static_cast<const char*>(P.hp) + P.hit_hp[hit + 1];
        next.nb = lines((pairs ? (I + 1) / 2 : I) * round_up(mw_next, W) * 4);
      }
      const int64_t n_tiles = ((nv + kWideMV - 1) / kWideMV) * ((hb + kWideNR - 1) / kWideNR);
      const int64_t per_tile = (next.na + next.nb + n_tiles - 1) / n_tiles;
      int64_t tile_i = 0;
      const T* B[kWideNR];
      alignas(64) float tile[kWideNR * kWideMV * W];
      int64_t sl[kWideMV * W];
      float rl[kWideMV * W];
      for (int64_t v0 = 0; v0 < nv; v0 += kWideMV) {
        const int mv = static_cast<int>(imin(kWideMV, nv - v0));
        const int64_t lanes = mv * W, r0 = v0 * W, valid = imin(lanes, mw - r0);
        for (int64_t l = 0; l < valid; ++l) {
          sl[l] = P.sorted[ex.begin + r0 + l];
          rl[l] = P.rw[sl[l]];
        }
        const void* xp = pairs ? static_cast<const void*>(reinterpret_cast<const uint32_t*>(hp) + r0)
                               : static_cast<const void*>(reinterpret_cast<const float*>(hp) + r0);
        for (int64_t n0 = h0; n0 < h1; n0 += kWideNR) {
          const int64_t nn = imin(kWideNR, h1 - n0);
          for (int j = 0; j < kWideNR; ++j) B[j] = w + (n0 + imin(j, nn - 1)) * I;
          wide_tile<T>(mv, xp, m_pad_e, B, I, tile, next.slice(per_tile * tile_i++, per_tile));
          for (int64_t l = 0; l < valid; ++l) {
            float* yr = y + sl[l] * hb + (n0 - h0);
            for (int64_t j = 0; j < nn; ++j) yr[j] = tile[j * lanes + l] * rl[l];
          }
        }
      }
    }
    const int64_t nn = ex.M - mw;
    if (nn > 0) {  // rows [mw, M): h rows, the block's rows of w_down as one sequential stream
      const NarrowA<T>* A[kMaxNarrowRows];
      narrow_rows<T>(P, ex, mw, h_rows, I, false, A, free_scratch);
      constexpr int64_t kRows = 16;
      float dots[kRows * kMaxNarrowRows], rws[kMaxNarrowRows];
      int64_t slots[kMaxNarrowRows];
      for (int64_t m = 0; m < nn; ++m) {
        slots[m] = P.sorted[ex.begin + mw + m];
        rws[m] = P.rw[slots[m]];
      }
      for (int64_t n = h0; n < h1; n += kRows) {
        const int64_t nr = imin(kRows, h1 - n);
        dot_rows<NarrowA<T>, T>(nn, A, w + n * I, nr, I, I, dots);
        for (int64_t m = 0; m < nn; ++m)
          for (int64_t r = 0; r < nr; ++r) y[slots[m] * hb + (n - h0) + r] = dots[r * nn + m] * rws[m];
      }
    }
  }
  // the k slots of each token in the order j = 0..k-1: each weighted product rounded to T (as the Triton down
  // epilogue, so CPU, GPU and expert parallelism, whose rows cross ranks in T, share one rounding), summed in fp32,
  // one rounding
  T* out = static_cast<T*>(P.out);
  T* const as_t = nullptr;
  for (int64_t t = 0; t < P.T; ++t) {
    const float* yt = y + t * k * hb;
    T* ot = out + t * H + h0;
    int64_t c = 0;
    for (; c + W <= hb; c += W) {
      F acc = V::round_t(V::load(yt + c), as_t);
      for (int64_t j = 1; j < k; ++j) acc = V::add(acc, V::round_t(V::load(yt + j * hb + c), as_t));
      V::store_t(ot + c, acc);
    }
    if (c < hb) {
      const int r = static_cast<int>(hb - c);
      F acc = V::round_t(V::load_n(yt + c, r), as_t);
      for (int64_t j = 1; j < k; ++j) acc = V::add(acc, V::round_t(V::load_n(yt + j * hb + c, r), as_t));
      V::store_t_n(ot + c, acc, r);
    }
  }
}

// ------------------------------------------------------------------------------------------ the table

template <class T>
void gate_up_t(const Problem& P, int64_t hit, int64_t c0, int64_t c1, char* scratch) {
  const Expert ex = expert_of(P, hit);
  switch (P.act) {
    case Act::silu: gate_up_block<T, Act::silu>(P, ex, c0, c1, scratch); break;
    case Act::gelu: gate_up_block<T, Act::gelu>(P, ex, c0, c1, scratch); break;
    case Act::gelu_tanh: gate_up_block<T, Act::gelu_tanh>(P, ex, c0, c1, scratch); break;
    default: gate_up_block<T, Act::relu>(P, ex, c0, c1, scratch); break;
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
  // narrow rows: their gate/up products and fp32 activation copies (x or h); wide: row pointers and packed x
  const int64_t narrow = 2 * kMaxNarrowRows * cols * 4 + kMaxNarrowRows * imax(P.H, P.I) * 4 + 3 * 64;
  const int64_t chunk = wide_chunk_rows(P.H, pairs);
  const int64_t wide = chunk * 8 + 64 + chunk * (pairs ? (P.H + 1) / 2 * 4 : P.H * 4) + 64;
  const int64_t down = P.S * hb * 4 + 64;
  return imax(narrow + wide, down + narrow) + 128;
}

}  // namespace

const Kernels& QWEN3MOE_KERNELS_FN() {
  // kWideRows / kNarrowRemainder: see the tile parameters
  static const Kernels table = {
      W, QWEN3MOE_DP != 0, 12, {kWideRows[0], kWideRows[1], kWideRows[2]},
      {kNarrowRemainder[0], kNarrowRemainder[1], kNarrowRemainder[2]}, &scratch_bytes, &gate_up_entry, &down_entry,
  };
  return table;
}

}  // namespace qwen3moe::experts
