// router_topk: the per-row arithmetic shared by the CPU (router_topk_cpu.cpp) and CUDA (router_topk.cu) kernels.
//
// One row of router logits [E] becomes fp32 probabilities p = softmax(logits) (max-subtracted, exp, times the
// reciprocal of the sum), then the k largest are chosen. The order is (p descending, expert id ascending), with
// NaN counted as the largest value, exactly as the reference's stable descending torch.sort orders them. A row
// with any NaN (or +inf, or only -inf) logit has NaN probabilities everywhere, so it selects experts 0..k-1
// with NaN weights, as the reference does.
//
// The order is encoded once into a 64-bit key per (p, id) so that "better" is plain unsigned ">" on both sides:
// high word = the float's bits made monotonic (NaN mapped above +inf), low word = ~id (lower id, bigger key).
// Keys are unique within a row (distinct ids), so there is never a tie between keys: the tie rule lives here.
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
// every NaN maps to 0xFFFFFFFF, above +inf (NaN is the largest value in torch.sort).
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

// exp(l - max) * inv_sum: one probability, as both kernels compute it (expf, not a fast approximation).
C10_HOST_DEVICE inline float softmax_prob(float logit, float row_max, float inv_sum) {
  return expf(logit - row_max) * inv_sum;
}

// Renormalisation of the k chosen weights: sum in selection order, then divide (the reference's w / w.sum()).
C10_HOST_DEVICE inline float renorm_sum(const float* w, int k) {
  float s = 0.0f;
  for (int j = 0; j < k; ++j) s += w[j];
  return s;
}

// One whole row on one thread (the CPU kernel; also usable by a single GPU thread). `keys` is scratch of E
// entries. Selection is k passes of "largest key not yet taken" when k is small, which is what the GPU warp
// does too; the CPU caller may instead sort keys for large k (same keys, same result).
template <typename scalar_t>
C10_HOST_DEVICE inline void softmax_keys_row(const scalar_t* logits, int E, uint64_t* keys) {
  float m = -INFINITY;
  for (int e = 0; e < E; ++e) m = nan_max(m, to_float(logits[e]));
  float s = 0.0f;
  for (int e = 0; e < E; ++e) s += expf(to_float(logits[e]) - m);
  const float inv = 1.0f / s;
  for (int e = 0; e < E; ++e) keys[e] = topk_key(softmax_prob(to_float(logits[e]), m, inv), e);
}

// k passes of argmax over the keys (taken ones zeroed). O(k * E): right for the decode/Qwen shapes (k <= 8).
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
