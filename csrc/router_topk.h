// router_topk: the per-row arithmetic shared by the CPU (router_topk_cpu.cpp) and CUDA (router_topk.cu) kernels.
//
// One row of router logits [E] becomes fp32 probabilities p = softmax(logits) (max-subtracted, exp, times the
// reciprocal of the sum), then the k largest are chosen. The order is (p descending, expert id ascending), with
// NaN counted as the largest value, exactly as the reference's stable descending torch.sort orders them. A row
// with any NaN (or +inf, or only -inf) logit has NaN probabilities everywhere, so it selects experts 0..k-1
// with NaN weights, as the reference does.
//
// The CUDA kernel encodes the order into a 64-bit key per (p, id) so that "better" is plain unsigned ">" in a
// warp max-reduction: high word = the float's bits made monotonic (NaN mapped above +inf), low word = ~id (lower
// id, bigger key). Keys are unique within a row (distinct ids).
//
// Which CPU path runs which function here (router_topk_cpu.cpp), so what the CPU tests exercise:
//   every row           to_float, softmax_row (with exp_nonpos), renorm_sum / renormalize_row
//   k <= 32, NaN-free   select_topk_row: one-pass insertion on the floats, the same order as the keys
//   k <= 32, NaN row    select_topk_nan_row
//   k > 32, every row   topk_key (order_bits), select_topk_passes (key_prob / from_order_bits, key_id): the GPU's
//                       k-rounds-of-argmax selection, NaN rows included (their keys are all the NaN image)
// GPU only: nan_max and softmax_prob (the CUDA kernel's max and probability; the CPU's softmax_row computes the
// same exp_nonpos(l - max) * inv in two loops), exp_nonpos of a NaN (softmax_row fills a NaN row without calling
// exp), and the zero key of the padding lanes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace qwen3moe::router {

// Largest E the kernels accept (Qwen3 uses 128; 60, 160, 256 exist in the family). The CUDA kernel keeps one
// row in one warp's registers: 512 / 32 = 16 values per lane.
constexpr int kMaxExperts = 512;

C10_HOST_DEVICE inline float to_float(float v) { return v; }
C10_HOST_DEVICE inline float to_float(c10::Half v) { return static_cast<float>(v); }
C10_HOST_DEVICE inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// max that propagates NaN from either side, as torch.max / softmax do.
C10_HOST_DEVICE inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Monotonic unsigned image of a float: a < b (as floats) <=> bits(a) < bits(b); -0 and +0 map together;
// every NaN maps to 0xFFFFFFFF, above +inf (NaN is the largest value in torch.sort). The -0 merge is defensive,
// keeping this a total order on all floats: no probability is -0 (exp_nonpos returns +0, a positive value or
// NaN; the reciprocal sum is positive), so no router input reaches that line and no test runs it.
C10_HOST_DEVICE inline uint32_t order_bits(float p) {
  if (p != p) return 0xFFFFFFFFu;
  if (p == 0.0f) p = 0.0f;  // -0 == +0
  uint32_t u;
  memcpy(&u, &p, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

C10_HOST_DEVICE inline float from_order_bits(uint32_t u) {
  if (u == 0xFFFFFFFFu) return NAN;
  uint32_t v = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float p;
  memcpy(&p, &v, sizeof(p));
  return p;
}

// The selection key of expert `id` with probability p: larger key = chosen earlier. Never 0 for id < 2^32-1,
// so 0 can mark "already taken".
C10_HOST_DEVICE inline uint64_t topk_key(float p, int32_t id) {
  return (static_cast<uint64_t>(order_bits(p)) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}
C10_HOST_DEVICE inline int32_t key_id(uint64_t key) { return static_cast<int32_t>(~static_cast<uint32_t>(key)); }
C10_HOST_DEVICE inline float key_prob(uint64_t key) { return from_order_bits(static_cast<uint32_t>(key >> 32)); }

// exp(x) for x <= 0 (x = logit - row max) or NaN, shared by both kernels so they compute identical values, and
// written without branches or calls so the compiler vectorises the CPU loop (glibc's expf is a scalar call and
// was most of the CPU router's time). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor
// polynomial (truncation < 1e-8 relative), then the scale 2^n applied as two normal factors so results in the
// subnormal range round once, like expf's. Within 2 ulp of expf over [-104, 0]; below that exp underflows to 0.
C10_HOST_DEVICE inline float exp_nonpos(float x) {
  const float xc = x < -104.0f ? -104.0f : x;  // NaN stays NaN here (the comparison is false)
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer (|t| < 2^22)
  const float r = (xc - fn * 0.693145751953125f) - fn * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int n = static_cast<int>(fn == fn ? fn : 0.0f);  // in [-150, 0]
  const int n1 = n / 2, n2 = n - n1;                      // each >= -75: 2^n1, 2^n2 are normal floats
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof(s1));
  memcpy(&s2, &b2, sizeof(s2));
  const float y = (p * s1) * s2;
  return x == x ? (x < -104.0f ? 0.0f : y) : x;
}

// exp(l - max) * inv_sum: one probability, as both kernels compute it.
C10_HOST_DEVICE inline float softmax_prob(float logit, float row_max, float inv_sum) {
  return exp_nonpos(logit - row_max) * inv_sum;
}

// Renormalisation of the k chosen weights: sum in selection order, then divide (the reference's w / w.sum()).
C10_HOST_DEVICE inline float renorm_sum(const float* w, int k) {
  float s = 0.0f;
  for (int j = 0; j < k; ++j) s += w[j];
  return s;
}

// One whole row on one thread (the CPU kernel): the probabilities into p[E]; returns false when the row has a
// NaN (then every probability is NaN and the selection is experts 0..k-1, see select_topk_row). Max and sum run
// over 8 interleaved partials combined pairwise: a fixed order (deterministic) that the compiler vectorises;
// the GPU's warp butterfly is another fixed order, so CPU and GPU weights may differ in the last ulp.
template <typename scalar_t>
C10_HOST_DEVICE inline bool softmax_row(const scalar_t* logits, int E, float* p) {
  float pm[8], ps[8];
  bool nan[8];
  for (int i = 0; i < 8; ++i) pm[i] = -INFINITY, ps[i] = 0.0f, nan[i] = false;
  int e = 0;
  for (; e + 8 <= E; e += 8) {
    for (int i = 0; i < 8; ++i) {
      const float x = to_float(logits[e + i]);
      nan[i] = nan[i] | (x != x);
      pm[i] = x > pm[i] ? x : pm[i];
    }
  }
  for (int i = 0; e < E; ++e, ++i) {
    const float x = to_float(logits[e]);
    nan[i] = nan[i] | (x != x);
    pm[i] = x > pm[i] ? x : pm[i];
  }
  bool any_nan = false;
  float m = -INFINITY;
  for (int i = 0; i < 8; ++i) any_nan = any_nan | nan[i], m = pm[i] > m ? pm[i] : m;
  // +inf (inf - inf) and an all -inf row (-inf - -inf) make NaN probabilities, as in torch.softmax
  if (any_nan || m == INFINITY || m == -INFINITY) {
    for (int i = 0; i < E; ++i) p[i] = NAN;
    return false;
  }
  for (e = 0; e < E; ++e) p[e] = exp_nonpos(to_float(logits[e]) - m);
  for (e = 0; e + 8 <= E; e += 8)
    for (int i = 0; i < 8; ++i) ps[i] += p[e + i];
  for (int i = 0; e < E; ++e, ++i) ps[i] += p[e];
  const float s = ((ps[0] + ps[1]) + (ps[2] + ps[3])) + ((ps[4] + ps[5]) + (ps[6] + ps[7]));
  const float inv = 1.0f / s;
  for (e = 0; e < E; ++e) p[e] = p[e] * inv;
  return true;
}

// The k best of a NaN-free row of probabilities by (p desc, id asc), in one pass: top-k kept sorted in
// (tp, ti); an expert enters only if strictly better than the k-th (visiting ids in ascending order, an equal
// probability already held has the lower id), and moves up only past strictly smaller probabilities. The same
// order as the 64-bit keys (topk_key), without building them. O(E + insertions * k), ~k ln(E/k) insertions.
C10_HOST_DEVICE inline void select_topk_row(const float* p, int E, int k, float* tp, int32_t* ti) {
  for (int j = 0; j < k; ++j) tp[j] = -1.0f, ti[j] = -1;
  for (int e = 0; e < E; ++e) {
    const float v = p[e];
    if (!(v > tp[k - 1])) continue;
    int j = k - 1;
    while (j > 0 && tp[j - 1] < v) {
      tp[j] = tp[j - 1];
      ti[j] = ti[j - 1];
      --j;
    }
    tp[j] = v;
    ti[j] = e;
  }
}

// A row whose probabilities are all NaN: NaN counts as the largest value and ties go to the lowest id.
C10_HOST_DEVICE inline void select_topk_nan_row(int k, float* w, int32_t* ids) {
  for (int j = 0; j < k; ++j) w[j] = NAN, ids[j] = j;
}

// k passes of argmax over the keys (taken ones zeroed). O(k * E): what a GPU warp does in parallel.
C10_HOST_DEVICE inline void select_topk_passes(uint64_t* keys, int E, int k, float* w, int32_t* ids) {
  for (int j = 0; j < k; ++j) {
    int best = 0;
    uint64_t bk = 0;
    for (int e = 0; e < E; ++e) {
      if (keys[e] > bk) { bk = keys[e]; best = e; }
    }
    keys[best] = 0;
    w[j] = key_prob(bk);
    ids[j] = key_id(bk);
  }
}

C10_HOST_DEVICE inline void renormalize_row(float* w, int k) {
  const float s = renorm_sum(w, k);
  for (int j = 0; j < k; ++j) w[j] = w[j] / s;
}

}  // namespace qwen3moe::router
