// RoPE (rotate-half / neox layout) and Qwen3's fused per-head q/k RMSNorm + RoPE on CPU, forward and backward,
// and the autograd kernels of the four forward ops:
//   rope(q, k, cos, sin)                          qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
//   rope_positions(q, k, position_ids, inv_freq)  qk_norm_rope_positions(q, k, q_weight, k_weight, pos, inv_freq, eps)
//
// Layout: q [B, S, Hq, D], k [B, S, Hk, D] with any strides for B, S and heads (views of a fused qkv projection
// work without a copy) and a contiguous last dim (otherwise a contiguous copy is made); cos, sin [1 or B, S, D] in
// the dtype of q; position_ids [1 or B, S] (int32/int64); inv_freq fp32 [D/2]. Outputs are contiguous.
//
// Arithmetic, exactly as transformers computes it in the input dtype: with y the (optionally normed) head row,
// out[:D/2] = y1*cos1 - y2*sin1 and out[D/2:] = y2*cos2 + y1*sin2, every product and the sum rounded to the
// input dtype (done as fp32 ops rounded once each, which equals the fp16/bf16 op). The per-head norm is
// rms_norm.h's (fp32 statistics, normed rounded, times weight rounded). From positions, each token's table is
// built as Qwen3MoeRotaryEmbedding does: freq = float(pos) * inv_freq in fp32, cos/sin in fp32, rounded to the
// input dtype.
//
// Work split: tokens (b, s) across threads; per token the cos/sin row is formed once and used by all Hq + Hk
// heads. Backward: d y = (g1*cos1 + g2*sin2, g2*cos2 - g1*sin1) in fp32, then the RMSNorm backward per head;
// dweight partials per fixed block of tokens (deterministic), summed in block order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "rms_norm.h"

namespace qwen3moe {

namespace {

using norm::from_f;
using norm::round_to;
using norm::to_f;

constexpr int64_t kBwdBlockTokens = 16;

struct RopeArgs {
  int64_t S = 0, D = 0, Hq = 0, Hk = 0;
  const void* q = nullptr;
  int64_t qsb = 0, qss = 0, qsh = 0;
  const void* k = nullptr;
  int64_t ksb = 0, kss = 0, ksh = 0;
  const void* qw = nullptr;  // null: no norm
  const void* kw = nullptr;
  float eps = 0.f;
  const void* cos = nullptr;  // table, or null when from positions
  const void* sin = nullptr;
  int64_t csb = 0, css = 0, ssb = 0, sss = 0;
  const int64_t* pos = nullptr;
  int64_t psb = 0, pss = 0;
  const float* inv_freq = nullptr;
  void* qo = nullptr;  // forward outputs / backward input grads, contiguous [B, S, H, D]
  void* ko = nullptr;
  const void* gq = nullptr;  // backward: output grads, contiguous [B, S, H, D]
  const void* gk = nullptr;
  float* dwq = nullptr;  // backward with norm: fp32 partials [blocks, D]
  float* dwk = nullptr;
};

// The cos/sin row of token t as fp32 values of the input dtype.
template <typename T>
QWEN3MOE_INLINE void token_table(const RopeArgs& a, int64_t t, float* c, float* s) {
  const int64_t b = t / a.S, i = t % a.S, D = a.D, half = D / 2;
  if (a.cos != nullptr) {
    const T* cr = static_cast<const T*>(a.cos) + b * a.csb + i * a.css;
    const T* sr = static_cast<const T*>(a.sin) + b * a.ssb + i * a.sss;
    for (int64_t d = 0; d < D; ++d) c[d] = to_f(cr[d]), s[d] = to_f(sr[d]);
  } else {
    const float p = static_cast<float>(a.pos[b * a.psb + i * a.pss]);
    for (int64_t d = 0; d < half; ++d) {
      const float f = p * a.inv_freq[d];
      c[d] = c[d + half] = round_to<T>(std::cos(f));
      s[d] = s[d + half] = round_to<T>(std::sin(f));
    }
  }
}

template <typename T>
QWEN3MOE_INLINE void head_forward(const T* x, const T* w, float eps, const float* c, const float* s, T* out,
                                  int64_t D, float* y) {
  const int64_t half = D / 2;
  if (w != nullptr) {
    const float rstd = norm::rstd_of(norm::sum_squares(x, D), D, eps);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = round_to<T>(to_f(w[d]) * round_to<T>(to_f(x[d]) * rstd));
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = to_f(x[d]);
  }
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    out[d] = from_f<T>(round_to<T>(y[d] * c[d]) - round_to<T>(y[d + half] * s[d]));
    out[d + half] = from_f<T>(round_to<T>(y[d + half] * c[d + half]) + round_to<T>(y[d] * s[d + half]));
  }
}

// g: grad of the head's output; dx: grad of its input; dw (nullable): fp32 accumulator of the weight grad.
template <typename T>
QWEN3MOE_INLINE void head_backward(const T* g, const T* x, const T* w, float eps, const float* c, const float* s,
                                   T* dx, float* dw, int64_t D, float* gy) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    const float g1 = to_f(g[d]), g2 = to_f(g[d + half]);
    gy[d] = g1 * c[d] + g2 * s[d + half];
    gy[d + half] = g2 * c[d + half] - g1 * s[d];
  }
  if (w == nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dx[d] = from_f<T>(gy[d]);
    return;
  }
  const float rstd = norm::rstd_of(norm::sum_squares(x, D), D, eps);
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) dot += gy[d] * to_f(w[d]) * (to_f(x[d]) * rstd);
  const float cm = dot / static_cast<float>(D);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float n = to_f(x[d]) * rstd;
    dx[d] = from_f<T>(rstd * (gy[d] * to_f(w[d]) - n * cm));
    dw[d] += gy[d] * round_to<T>(n);
  }
}

template <typename T>
QWEN3MOE_INLINE void tokens_forward(const RopeArgs& a, int64_t t0, int64_t t1) {
  const int64_t D = a.D;
  std::vector<float> buf(3 * D);
  float *c = buf.data(), *s = c + D, *y = s + D;
  for (int64_t t = t0; t < t1; ++t) {
    token_table<T>(a, t, c, s);
    const int64_t b = t / a.S, i = t % a.S;
    const T* qr = static_cast<const T*>(a.q) + b * a.qsb + i * a.qss;
    const T* kr = static_cast<const T*>(a.k) + b * a.ksb + i * a.kss;
    T* qo = static_cast<T*>(a.qo) + t * a.Hq * D;
    T* ko = static_cast<T*>(a.ko) + t * a.Hk * D;
    for (int64_t h = 0; h < a.Hq; ++h)
      head_forward<T>(qr + h * a.qsh, static_cast<const T*>(a.qw), a.eps, c, s, qo + h * D, D, y);
    for (int64_t h = 0; h < a.Hk; ++h)
      head_forward<T>(kr + h * a.ksh, static_cast<const T*>(a.kw), a.eps, c, s, ko + h * D, D, y);
  }
}

// Tokens of blocks [blk0, blk1); each block's weight-grad partial goes to its own row of dwq / dwk.
template <typename T>
QWEN3MOE_INLINE void blocks_backward(const RopeArgs& a, int64_t ntok, int64_t blk0, int64_t blk1) {
  const int64_t D = a.D;
  std::vector<float> buf(3 * D);
  float *c = buf.data(), *s = c + D, *gy = s + D;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    float* dwq = a.qw != nullptr ? a.dwq + blk * D : nullptr;
    float* dwk = a.kw != nullptr ? a.dwk + blk * D : nullptr;
    const int64_t t1 = std::min(ntok, (blk + 1) * kBwdBlockTokens);
    for (int64_t t = blk * kBwdBlockTokens; t < t1; ++t) {
      token_table<T>(a, t, c, s);
      const int64_t b = t / a.S, i = t % a.S;
      const T* qr = static_cast<const T*>(a.q) + b * a.qsb + i * a.qss;
      const T* kr = static_cast<const T*>(a.k) + b * a.ksb + i * a.kss;
      const T* gq = static_cast<const T*>(a.gq) + t * a.Hq * D;
      const T* gk = static_cast<const T*>(a.gk) + t * a.Hk * D;
      T* dq = static_cast<T*>(a.qo) + t * a.Hq * D;
      T* dk = static_cast<T*>(a.ko) + t * a.Hk * D;
      for (int64_t h = 0; h < a.Hq; ++h)
        head_backward<T>(gq + h * D, qr + h * a.qsh, static_cast<const T*>(a.qw), a.eps, c, s, dq + h * D, dwq, D,
                         gy);
      for (int64_t h = 0; h < a.Hk; ++h)
        head_backward<T>(gk + h * D, kr + h * a.ksh, static_cast<const T*>(a.kw), a.eps, c, s, dk + h * D, dwk, D,
                         gy);
    }
  }
}

#define QWEN3MOE_ROPE_TOKENS(T, SUFFIX)                                                                   \
  QWEN3MOE_CLONES void tokens_forward_##SUFFIX(const RopeArgs& a, int64_t t0, int64_t t1) {              \
    tokens_forward<T>(a, t0, t1);                                                                        \
  }                                                                                                      \
  QWEN3MOE_CLONES void blocks_backward_##SUFFIX(const RopeArgs& a, int64_t n, int64_t b0, int64_t b1) {  \
    blocks_backward<T>(a, n, b0, b1);                                                                    \
  }                                                                                                      \
  void tokens_forward_any(T, const RopeArgs& a, int64_t t0, int64_t t1) { tokens_forward_##SUFFIX(a, t0, t1); } \
  void blocks_backward_any(T, const RopeArgs& a, int64_t n, int64_t b0, int64_t b1) {                    \
    blocks_backward_##SUFFIX(a, n, b0, b1);                                                              \
  }

QWEN3MOE_ROPE_TOKENS(float, f32)
QWEN3MOE_ROPE_TOKENS(c10::Half, f16)
QWEN3MOE_ROPE_TOKENS(c10::BFloat16, bf16)
#undef QWEN3MOE_ROPE_TOKENS

// ---------------------------------------------------------------------------------------------------- checks

void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& qw,
                     const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& cos,
                     const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& pos,
                     const std::optional<at::Tensor>& inv_freq, double eps) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D [B, S, Hq, D], got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D [B, S, Hk, D], got ", k.dim(), " dims");
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": q dtype must be float32/float16/bfloat16, got ", st);
  TORCH_CHECK_TYPE(k.scalar_type() == st, op, ": k dtype ", k.scalar_type(), " != q dtype ", st);
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k must be on the device of q (", q.device(), ")");
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == S && k.size(3) == D, op, ": k must be [", B, ", ", S, ", Hk, ", D,
                    "] like q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(D >= 2 && D % 2 == 0, op, ": head_dim (q.size(3)) must be even and >= 2, got ", D);
  auto check_weight = [&](const std::optional<at::Tensor>& w, const char* name) {
    if (!w.has_value()) return;
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == D, op, ": ", name, " must have shape [", D, "], got ", w->sizes());
    TORCH_CHECK_TYPE(w->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", w->scalar_type(), " != q dtype ",
                     q.scalar_type());
    TORCH_CHECK_VALUE(w->device() == q.device(), op, ": ", name, " must be on the device of q");
  };
  check_weight(qw, "q_weight");
  check_weight(kw, "k_weight");
  if (qw.has_value() || kw.has_value()) TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  auto check_table = [&](const std::optional<at::Tensor>& t, const char* name) {
    TORCH_CHECK_VALUE(t.has_value(), op, ": ", name, " is required");
    TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == S && t->size(2) == D, op,
                      ": ", name, " must be [", B, " or 1, ", S, ", ", D, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", t->scalar_type(), " != q dtype ",
                     q.scalar_type(), " (transformers casts cos/sin to the activations' dtype)");
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on the device of q");
  };
  if (!pos.has_value()) {
    check_table(cos, "cos");
    check_table(sin, "sin");
  } else {
    TORCH_CHECK_VALUE(pos->dim() == 2 && (pos->size(0) == B || pos->size(0) == 1) && pos->size(1) == S, op,
                      ": position_ids must be [", B, " or 1, ", S, "], got ", pos->sizes());
    TORCH_CHECK_TYPE(pos->scalar_type() == at::kLong || pos->scalar_type() == at::kInt, op,
                     ": position_ids must be int32 or int64, got ", pos->scalar_type());
    TORCH_CHECK_VALUE(pos->device() == q.device(), op, ": position_ids must be on the device of q");
    TORCH_CHECK_VALUE(inv_freq.has_value() && inv_freq->dim() == 1 && inv_freq->size(0) == D / 2, op,
                      ": inv_freq must be [", D / 2, "]");
    TORCH_CHECK_TYPE(inv_freq->scalar_type() == at::kFloat, op, ": inv_freq must be float32, got ",
                     inv_freq->scalar_type());
    TORCH_CHECK_VALUE(inv_freq->device() == q.device(), op, ": inv_freq must be on the device of q");
  }
}

at::Tensor last_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Fills the table / positions part of RopeArgs; the tensors it points into are kept alive in `keep`.
void set_source(RopeArgs& a, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& inv_freq,
                std::vector<at::Tensor>& keep) {
  if (!pos.has_value()) {
    at::Tensor c = last_contig(*cos), s = last_contig(*sin);
    keep.push_back(c), keep.push_back(s);
    a.cos = c.const_data_ptr(), a.sin = s.const_data_ptr();
    a.csb = c.size(0) == 1 ? 0 : c.stride(0), a.css = c.stride(1);
    a.ssb = s.size(0) == 1 ? 0 : s.stride(0), a.sss = s.stride(1);
  } else {
    at::Tensor p = pos->to(at::kLong), f = inv_freq->contiguous();
    keep.push_back(p), keep.push_back(f);
    a.pos = p.const_data_ptr<int64_t>(), a.inv_freq = f.const_data_ptr<float>();
    a.psb = p.size(0) == 1 ? 0 : p.stride(0), a.pss = p.stride(1);
  }
}

void set_qk(RopeArgs& a, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& qw,
            const std::optional<at::Tensor>& kw, double eps, std::vector<at::Tensor>& keep) {
  at::Tensor qc = last_contig(q), kc = last_contig(k);
  keep.push_back(qc), keep.push_back(kc);
  a.S = q.size(1), a.D = q.size(3), a.Hq = q.size(2), a.Hk = k.size(2);
  a.q = qc.const_data_ptr(), a.qsb = qc.stride(0), a.qss = qc.stride(1), a.qsh = qc.stride(2);
  a.k = kc.const_data_ptr(), a.ksb = kc.stride(0), a.kss = kc.stride(1), a.ksh = kc.stride(2);
  if (qw.has_value()) keep.push_back(qw->contiguous()), a.qw = keep.back().const_data_ptr();
  if (kw.has_value()) keep.push_back(kw->contiguous()), a.kw = keep.back().const_data_ptr();
  a.eps = static_cast<float>(eps);
}

std::tuple<at::Tensor, at::Tensor> rope_forward_cpu(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                    const std::optional<at::Tensor>& qw,
                                                    const std::optional<at::Tensor>& kw,
                                                    const std::optional<at::Tensor>& cos,
                                                    const std::optional<at::Tensor>& sin,
                                                    const std::optional<at::Tensor>& pos,
                                                    const std::optional<at::Tensor>& inv_freq, double eps) {
  check_rope_args(op, q, k, qw, kw, cos, sin, pos, inv_freq, eps);
  at::Tensor qo = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ko = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t ntok = q.size(0) * q.size(1);
  if (ntok == 0) return {qo, ko};
  RopeArgs a;
  std::vector<at::Tensor> keep;
  set_qk(a, q, k, qw, kw, eps, keep);
  set_source(a, cos, sin, pos, inv_freq, keep);
  a.qo = qo.mutable_data_ptr(), a.ko = ko.mutable_data_ptr();
  const int64_t per_token = (a.Hq + a.Hk) * a.D;
  norm::dispatch_dtype(q.scalar_type(), op, [&](auto tag) {
    // ~64K elements per task (a decode step's 1-8 tokens stay on one thread: waking another costs more)
    at::parallel_for(0, ntok, std::max<int64_t>(1, 65536 / std::max<int64_t>(per_token, 1)),
                     [&](int64_t t0, int64_t t1) { tokens_forward_any(tag, a, t0, t1); });
  });
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& pos,
    const std::optional<at::Tensor>& inv_freq, double eps) {
  const char* op = "qk_norm_rope_backward";
  check_rope_args(op, q, k, qw, kw, cos, sin, pos, inv_freq, eps);
  TORCH_CHECK_VALUE(grad_q.sizes() == q.sizes(), op, ": grad_q must have q's shape ", q.sizes());
  TORCH_CHECK_TYPE(grad_q.scalar_type() == q.scalar_type(), op, ": grad_q must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(grad_k.sizes() == k.sizes(), op, ": grad_k must have k's shape ", k.sizes());
  TORCH_CHECK_TYPE(grad_k.scalar_type() == k.scalar_type(), op, ": grad_k must have k's dtype ", k.scalar_type());
  const int64_t D = q.size(3), ntok = q.size(0) * q.size(1);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t nblocks = (ntok + kBwdBlockTokens - 1) / kBwdBlockTokens;
  at::Tensor pq = at::zeros({qw.has_value() ? nblocks : 0, D}, q.options().dtype(at::kFloat));
  at::Tensor pk = at::zeros({kw.has_value() ? nblocks : 0, D}, q.options().dtype(at::kFloat));
  if (ntok > 0) {
    RopeArgs a;
    std::vector<at::Tensor> keep;
    set_qk(a, q, k, qw, kw, eps, keep);
    set_source(a, cos, sin, pos, inv_freq, keep);
    at::Tensor gq = grad_q.contiguous(), gk = grad_k.contiguous();
    a.gq = gq.const_data_ptr(), a.gk = gk.const_data_ptr();
    a.qo = dq.mutable_data_ptr(), a.ko = dk.mutable_data_ptr();
    a.dwq = qw.has_value() ? pq.mutable_data_ptr<float>() : nullptr;
    a.dwk = kw.has_value() ? pk.mutable_data_ptr<float>() : nullptr;
    norm::dispatch_dtype(q.scalar_type(), op, [&](auto tag) {
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(kBwdBlockTokens * (a.Hq + a.Hk) * D, 1));
      at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) { blocks_backward_any(tag, a, ntok, b0, b1); });
    });
  }
  // Second stage of the weight gradients: block partials summed in block order, rounded once.
  at::Tensor dqw = qw.has_value() ? pq.sum(0).to(q.scalar_type()) : at::empty({0}, q.options());
  at::Tensor dkw = kw.has_value() ? pk.sum(0).to(q.scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dqw, dkw};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  return rope_forward_cpu("rope", q, k, std::nullopt, std::nullopt, cos, sin, std::nullopt, std::nullopt, 1.0);
}

std::tuple<at::Tensor, at::Tensor> rope_positions_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                      const at::Tensor& inv_freq) {
  return rope_forward_cpu("rope_positions", q, k, std::nullopt, std::nullopt, std::nullopt, std::nullopt, pos,
                          inv_freq, 1.0);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qw,
                                                    const at::Tensor& kw, const at::Tensor& cos, const at::Tensor& sin,
                                                    double eps) {
  return rope_forward_cpu("qk_norm_rope", q, k, qw, kw, cos, sin, std::nullopt, std::nullopt, eps);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_positions_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& qw, const at::Tensor& kw,
                                                              const at::Tensor& pos, const at::Tensor& inv_freq,
                                                              double eps) {
  return rope_forward_cpu("qk_norm_rope_positions", q, k, qw, kw, std::nullopt, std::nullopt, pos, inv_freq, eps);
}

// ------------------------------------------------------------------------------------------------ autograd

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptT = std::optional<at::Tensor>;

std::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

// One autograd Function for the four forward ops: `fwd` runs the op below autograd; the backward is
// qwen3moe::qk_norm_rope_backward (norm and table/positions given as optionals). Gradients for cos, sin,
// position_ids and inv_freq are not computed: asking for them is an error, never a silent zero. So is double
// backward (the backward op is not differentiable; rms_norm.h once_differentiable).
class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  template <typename F>
  static variable_list forward(AutogradContext* ctx, F fwd, const at::Tensor& q, const at::Tensor& k, const OptT& qw,
                               const OptT& kw, const OptT& cos, const OptT& sin, const OptT& pos,
                               const OptT& inv_freq, double eps) {
    auto grad_asked = [](const OptT& t) { return t.has_value() && t->requires_grad(); };
    TORCH_CHECK_NOT_IMPLEMENTED(!grad_asked(cos) && !grad_asked(sin) && !grad_asked(inv_freq),
                                "rope: gradients with respect to cos / sin / inv_freq are not implemented "
                                "(detach them)");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [qo, ko] = fwd();
    auto val = [](const OptT& t) { return t.has_value() ? *t : at::Tensor(); };
    ctx->save_for_backward({q, k, val(qw), val(kw), val(cos), val(sin), val(pos), val(inv_freq)});
    ctx->saved_data["eps"] = eps;
    return {qo, ko};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qwen3moe::qk_norm_rope_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                const OptT&, const OptT&, const OptT&, const OptT&, double)>();
    auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    return once_differentiable("rope", {grads[0], grads[1], s[0], s[1], s[2], s[3]}, [&]() -> variable_list {
      auto [dq, dk, dqw, dkw] = op.call(grads[0], grads[1], s[0], s[1], opt(s[2]), opt(s[3]), opt(s[4]), opt(s[5]),
                                        opt(s[6]), opt(s[7]), eps);
      // inputs: fwd, q, k, qw, kw, cos, sin, pos, inv_freq, eps
      return {at::Tensor(), dq, dk, s[2].defined() ? dqw : at::Tensor(), s[3].defined() ? dkw : at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    });
  }
};

std::tuple<at::Tensor, at::Tensor> to_pair(const variable_list& v) { return {v[0], v[1]}; }

std::tuple<at::Tensor, at::Tensor> rope_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qwen3moe::rope", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto f = [&] { return op.call(q, k, cos, sin); };
  return to_pair(RopeFn::apply(f, q, k, OptT(), OptT(), OptT(cos), OptT(sin), OptT(), OptT(), 1.0));
}

std::tuple<at::Tensor, at::Tensor> rope_positions_autograd(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& pos, const at::Tensor& inv_freq) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qwen3moe::rope_positions", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto f = [&] { return op.call(q, k, pos, inv_freq); };
  return to_pair(RopeFn::apply(f, q, k, OptT(), OptT(), OptT(), OptT(), OptT(pos), OptT(inv_freq), 1.0));
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& qw, const at::Tensor& kw,
                                                         const at::Tensor& cos, const at::Tensor& sin, double eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qwen3moe::qk_norm_rope", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double)>();
  auto f = [&] { return op.call(q, k, qw, kw, cos, sin, eps); };
  return to_pair(RopeFn::apply(f, q, k, OptT(qw), OptT(kw), OptT(cos), OptT(sin), OptT(), OptT(), eps));
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_positions_autograd(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& qw, const at::Tensor& kw,
                                                                   const at::Tensor& pos, const at::Tensor& inv_freq,
                                                                   double eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qwen3moe::qk_norm_rope_positions", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double)>();
  auto f = [&] { return op.call(q, k, qw, kw, pos, inv_freq, eps); };
  return to_pair(RopeFn::apply(f, q, k, OptT(qw), OptT(kw), OptT(), OptT(), OptT(pos), OptT(inv_freq), eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_positions", &rope_positions_cpu);
  m.impl("qk_norm_rope", &qk_norm_rope_cpu);
  m.impl("qk_norm_rope_positions", &qk_norm_rope_positions_cpu);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_cpu);
}

TORCH_LIBRARY_IMPL(qwen3moe, Autograd, m) {
  m.impl("rope", &rope_autograd);
  m.impl("rope_positions", &rope_positions_autograd);
  m.impl("qk_norm_rope", &qk_norm_rope_autograd);
  m.impl("qk_norm_rope_positions", &qk_norm_rope_positions_autograd);
}

}  // namespace qwen3moe
