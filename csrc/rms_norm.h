// Per-row RMSNorm arithmetic shared by the CPU kernels of rms_norm, fused_add_rms_norm and qk_norm_rope
// (rms_norm_cpu.cpp, rope_cpu.cpp). The GPU kernels of these ops are Triton (qwen3moe_kernels/kernels/).
//
// Rounding follows Hugging Face's Qwen3MoeRMSNorm exactly: the sum of squares and x * rsqrt(mean + eps) in fp32,
// normed rounded to the input dtype, then weight * normed in the input dtype. The product of two fp16/bf16
// values is exact in fp32, so "fp32 multiply, round once" is the input-dtype multiply. Loops are written so
// the compiler can vectorise them: `omp simd reduction` allows the reordered fp32 sum (torch's own sum is
// reordered too), and the hot row functions are compiled once per x86 level (target_clones) so AVX-512 and AVX2
// machines get their vector width from one binary.
//
// Also here: once_differentiable, the double-backward guard shared by the C++ autograd Functions of both files.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define QWEN3MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QWEN3MOE_CLONES
#endif
#define QWEN3MOE_INLINE inline __attribute__((always_inline))

namespace qwen3moe::norm {

// fp32 <-> storage conversions. bf16: the top 16 bits; rounding to nearest even, NaN kept quiet (as c10). fp16:
// through the compiler's _Float16 (one vcvtph2ps/vcvtps2ph with F16C, IEEE round to nearest even).
QWEN3MOE_INLINE float to_f(float v) { return v; }
QWEN3MOE_INLINE float to_f(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
QWEN3MOE_INLINE float to_f(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return static_cast<float>(h);
}

template <typename T>
QWEN3MOE_INLINE T from_f(float v);
template <>
QWEN3MOE_INLINE float from_f<float>(float v) {
  return v;
}
template <>
QWEN3MOE_INLINE c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  return out;
}
template <>
QWEN3MOE_INLINE c10::Half from_f<c10::Half>(float v) {
  _Float16 h = static_cast<_Float16>(v);
  c10::Half out;
  std::memcpy(&out.x, &h, 2);
  return out;
}

// Round an fp32 value to T and back (the "in the input dtype" steps of the reference).
template <typename T>
QWEN3MOE_INLINE float round_to(float v) {
  return to_f(from_f<T>(v));
}

template <typename T>
QWEN3MOE_INLINE float sum_squares(const T* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    float v = to_f(x[i]);
    acc += v * v;
  }
  return acc;
}

// 1 / sqrt(mean + eps) as torch.rsqrt computes it on CPU (a correctly rounded sqrt, then a division).
QWEN3MOE_INLINE float rstd_of(float sumsq, int64_t n, float eps) {
  return 1.0f / std::sqrt(sumsq / static_cast<float>(n) + eps);
}

// out = weight * round(x * rstd), rounded to T.
template <typename T>
QWEN3MOE_INLINE void scale_row(const T* x, const T* w, T* out, int64_t n, float rstd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(to_f(w[i]) * round_to<T>(to_f(x[i]) * rstd));
}

// Backward of one row of y = weight * round(x * rstd) (the rounding counts as identity): with n = x * rstd and
// dn = dy * weight, dx = rstd * (dn - n * mean(dn * n)); dw_acc += dy * round(n) (fp32, deterministic order).
template <typename T>
QWEN3MOE_INLINE void backward_row(const T* dy, const T* x, const T* w, T* dx, float* dw_acc, int64_t n, float eps) {
  const float rstd = rstd_of(sum_squares(x, n), n, eps);
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += to_f(dy[i]) * to_f(w[i]) * (to_f(x[i]) * rstd);
  const float c = dot / static_cast<float>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float nv = to_f(x[i]) * rstd;
    float g = to_f(dy[i]);
    dx[i] = from_f<T>(rstd * (g * to_f(w[i]) - nv * c));
    if (dw_acc != nullptr) dw_acc[i] += g * round_to<T>(nv);
  }
}

// Calls f(T{}) with T the storage type of fp32 / fp16 / bf16; any other dtype is an error naming the op.
template <typename F>
void dispatch_dtype(c10::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": dtype must be float32/float16/bfloat16, got ", st);
  }
}

}  // namespace qwen3moe::norm

namespace qwen3moe {

// The backward ops (rms_norm_backward, qk_norm_rope_backward) have no autograd kernel of their own, so under
// create_graph=True torch's not-implemented fallback would only warn and give zero second derivatives. Instead,
// as torch.autograd.function.once_differentiable does: `backward` (returning the gradient list) runs with grad mode
// off, and when grad mode is on (create_graph) and one of `inputs` (the incoming grads and the saved tensors)
// requires grad, the gradients get an Error node as grad_fn, so differentiating them again raises
// "<op>: double backward is not supported". First-order backward (grad mode off) returns the gradients as is.
template <typename F>
torch::autograd::variable_list once_differentiable(const char* op, const torch::autograd::variable_list& inputs,
                                                   F&& backward) {
  torch::autograd::variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = backward();
  }
  if (!torch::autograd::compute_requires_grad(inputs)) return grads;
  const std::string msg = std::string(op) + ": double backward is not supported";
  return torch::autograd::wrap_outputs(inputs, std::move(grads), [&](torch::autograd::edge_list&& next) {
    return c10::make_intrusive<torch::autograd::Error>(msg, std::move(next));
  });
}

}  // namespace qwen3moe
