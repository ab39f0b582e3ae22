// rms_norm / fused_add_rms_norm / rms_norm_backward on CPU, and the autograd kernels of the two forward ops.
//
// Layout: x [..., H] viewed as [rows, H] with any row stride (the last dim must be contiguous, otherwise a
// contiguous copy is made); outputs are contiguous. Rows are split across threads with at::parallel_for; one
// pass per row (residual add, sum of squares, scale) with the arithmetic of rms_norm.h.
//
// Backward: dx per row (rms_norm.h backward_row) and dweight as a deterministic two-stage reduction: fixed blocks
// of kBwdBlockRows rows each sum their rows into an fp32 partial [H] (independent of the thread count), then the
// partials are summed in block order.
//
// Autograd is C++ (a torch::autograd::Function per op registered for the Autograd key), so a call that needs no
// gradient costs one dispatcher hop, not a Python autograd wrapper. The backward calls qwen3moe::rms_norm_backward
// through the dispatcher: this file's CPU kernel, or the Triton kernel that Python registers for CUDA. That op is not
// differentiable: double backward (create_graph=True, then differentiating the gradients) raises (rms_norm.h
// once_differentiable).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "rms_norm.h"

namespace qwen3moe {

namespace {

using norm::from_f;
using norm::to_f;

constexpr int64_t kBwdBlockRows = 32;

void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dim");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": x dtype must be float32/float16/bfloat16, got ", st);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
                    "], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(), " != x dtype ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight must be on the device of x (", x.device(), "), got ",
                    weight.device());
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

// [rows, H] view (or copy) with a contiguous last dim; rows = product of the leading dims (T = 0 safe).
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t h = t.size(-1);
  const int64_t rows = h == 0 ? 0 : t.numel() / h;
  at::Tensor c = t.stride(-1) == 1 || t.numel() == 0 ? t : t.contiguous();
  return c.reshape({rows, h});
}

// ~32K elements per task: a smaller task costs more in thread wake-up than it saves (decode rows stay on one thread).
int64_t row_grain(int64_t h) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(h, 1)); }

template <typename T>
QWEN3MOE_INLINE void forward_rows(const T* x, int64_t sx, const T* r, int64_t sr, const T* w, T* out, T* new_res,
                                  int64_t h, float eps, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const T* src = x + row * sx;
    if (r != nullptr) {
      const T* rr = r + row * sr;
      T* nr = new_res + row * h;
      // fp32 add rounded once == the input-dtype add (fp32 has >= 2p+2 bits: no double rounding).
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) nr[i] = from_f<T>(to_f(src[i]) + to_f(rr[i]));
      src = nr;
    }
    const float rstd = norm::rstd_of(norm::sum_squares(src, h), h, eps);
    norm::scale_row(src, w, out + row * h, h, rstd);
  }
}

template <typename T>
QWEN3MOE_INLINE void backward_rows(const T* dy, const T* x, int64_t sx, const T* w, T* dx, float* dw, int64_t h,
                                   float eps, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row)
    norm::backward_row(dy + row * h, x + row * sx, w, dx + row * h, dw, h, eps);
}

// One vector-width build per x86 level of each hot loop (see QWEN3MOE_CLONES in rms_norm.h).
#define QWEN3MOE_NORM_ROWS(T, SUFFIX)                                                                           \
  QWEN3MOE_CLONES void forward_rows_##SUFFIX(const T* x, int64_t sx, const T* r, int64_t sr, const T* w, T* out, \
                                             T* nr, int64_t h, float eps, int64_t b, int64_t e) {               \
    forward_rows<T>(x, sx, r, sr, w, out, nr, h, eps, b, e);                                                     \
  }                                                                                                              \
  QWEN3MOE_CLONES void backward_rows_##SUFFIX(const T* dy, const T* x, int64_t sx, const T* w, T* dx, float* dw, \
                                              int64_t h, float eps, int64_t b, int64_t e) {                      \
    backward_rows<T>(dy, x, sx, w, dx, dw, h, eps, b, e);                                                        \
  }                                                                                                              \
  void forward_rows_any(const T* x, int64_t sx, const T* r, int64_t sr, const T* w, T* out, T* nr, int64_t h,    \
                        float eps, int64_t b, int64_t e) {                                                       \
    forward_rows_##SUFFIX(x, sx, r, sr, w, out, nr, h, eps, b, e);                                               \
  }                                                                                                              \
  void backward_rows_any(const T* dy, const T* x, int64_t sx, const T* w, T* dx, float* dw, int64_t h,           \
                         float eps, int64_t b, int64_t e) {                                                      \
    backward_rows_##SUFFIX(dy, x, sx, w, dx, dw, h, eps, b, e);                                                  \
  }

QWEN3MOE_NORM_ROWS(float, f32)
QWEN3MOE_NORM_ROWS(c10::Half, f16)
QWEN3MOE_NORM_ROWS(c10::BFloat16, bf16)
#undef QWEN3MOE_NORM_ROWS

void norm_forward_cpu(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
                      at::Tensor& out, at::Tensor* new_res) {
  const int64_t h = x.size(-1);
  if (x.numel() == 0) return;
  at::Tensor x2 = as_rows(x);
  at::Tensor r2 = residual ? as_rows(*residual) : at::Tensor();
  at::Tensor w = weight.contiguous();
  const int64_t rows = x2.size(0);
  norm::dispatch_dtype(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? r2.const_data_ptr<scalar_t>() : nullptr;
    const int64_t sx = x2.stride(0), sr = residual ? r2.stride(0) : 0;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* np = new_res ? new_res->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(h), [&](int64_t b, int64_t e) {
      forward_rows_any(xp, sx, rp, sr, wp, op, np, h, static_cast<float>(eps), b, e);
    });
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm", x, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  norm_forward_cpu(x, nullptr, weight, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  check_norm_args("fused_add_rms_norm", x, weight, eps);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "fused_add_rms_norm: residual shape ", residual.sizes(),
                    " != x shape ", x.sizes());
  TORCH_CHECK_TYPE(residual.scalar_type() == x.scalar_type(), "fused_add_rms_norm: residual dtype ",
                   residual.scalar_type(), " != x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == x.device(), "fused_add_rms_norm: residual must be on the device of x");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor new_res = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  norm_forward_cpu(x, &residual, weight, eps, out, &new_res);
  return {out, new_res};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm_backward", x, weight, eps);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "rms_norm_backward: grad_out must have x's shape ", x.sizes(),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "rms_norm_backward: grad_out must have x's dtype ",
                   x.scalar_type(), ", got ", grad_out.scalar_type());
  const int64_t h = x.size(-1);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return {dx, at::zeros_like(weight)};
  at::Tensor x2 = as_rows(x);
  at::Tensor g2 = as_rows(grad_out).contiguous();
  at::Tensor w = weight.contiguous();
  const int64_t rows = x2.size(0);
  const int64_t nblocks = (rows + kBwdBlockRows - 1) / kBwdBlockRows;
  at::Tensor partial = at::zeros({nblocks, h}, x.options().dtype(at::kFloat));
  norm::dispatch_dtype(x.scalar_type(), "rms_norm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      const scalar_t* gp = g2.const_data_ptr<scalar_t>();
      const scalar_t* xp = x2.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
      float* pp = partial.mutable_data_ptr<float>();
      const int64_t sx = x2.stride(0);
      at::parallel_for(0, nblocks, std::max<int64_t>(1, row_grain(h) / kBwdBlockRows), [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t r0 = blk * kBwdBlockRows, r1 = std::min(rows, r0 + kBwdBlockRows);
          backward_rows_any(gp, xp, sx, wp, dp, pp + blk * h, h, static_cast<float>(eps), r0, r1);
        }
      });
    }
  });
  // Second stage: the block partials summed in block order (torch's dim-0 sum of a contiguous fp32 matrix
  // reduces each column in a fixed order), rounded once to the weight dtype.
  return {dx, partial.sum(0).to(weight.scalar_type())};
}

// ------------------------------------------------------------------------------------------------ autograd

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_rms_norm_backward(const at::Tensor& g, const at::Tensor& x,
                                                          const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qwen3moe::rms_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double)>();
  return op.call(g, x, w, eps);
}

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("qwen3moe::rms_norm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return op.call(x, weight, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    return once_differentiable("rms_norm", {grads[0], saved[0], saved[1]}, [&]() -> variable_list {
      auto [dx, dw] = call_rms_norm_backward(grads[0], saved[0], saved[1], eps);
      return {dx, dw, at::Tensor()};
    });
  }
};

class FusedAddRmsNormFn : public torch::autograd::Function<FusedAddRmsNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("qwen3moe::fused_add_rms_norm", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, double)>();
    auto [out, new_res] = op.call(x, residual, weight, eps);
    ctx->save_for_backward({new_res, weight});
    ctx->saved_data["eps"] = eps;
    return {out, new_res};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    return once_differentiable("fused_add_rms_norm", {grads[0], grads[1], saved[0], saved[1]}, [&]() -> variable_list {
      auto [dx, dw] = call_rms_norm_backward(grads[0], saved[0], saved[1], eps);
      at::Tensor d = dx.add(grads[1]);  // new_residual = residual + x: both inputs get the same gradient
      return {d, d, dw, at::Tensor()};
    });
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RmsNormFn::apply(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_autograd(const at::Tensor& x, const at::Tensor& residual,
                                                               const at::Tensor& weight, double eps) {
  auto outs = FusedAddRmsNormFn::apply(x, residual, weight, eps);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(qwen3moe, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_autograd);
}

}  // namespace qwen3moe
