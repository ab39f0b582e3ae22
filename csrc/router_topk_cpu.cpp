// router_topk on CPU: rows split across threads with at::parallel_for; each row runs the shared per-row code of
// router_topk.h (see there for the order and the NaN rule):
//   * every row: softmax_row (fp32 probabilities; false for a NaN row), then renormalize_row if asked;
//   * k <= 32, NaN-free row: select_topk_row, a one-pass insertion on the floats (the fast path: Qwen3 uses k = 8);
//   * k <= 32, NaN row: select_topk_nan_row (experts 0..k-1, NaN weights);
//   * k > 32, every row (NaN rows included): the GPU's selection, the 64-bit keys of topk_key and k rounds of
//     argmax (select_topk_passes), so the key encoding, its NaN image and the ~id tie-break run on CPU too.
// Both selections give the reference's order, so the CPU result does not depend on which path ran.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "router_topk.h"

namespace qwen3moe {

void check_router_topk_args(const at::Tensor& logits, int64_t top_k) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "router_topk: logits must be 2-D [T, E], got ", logits.dim(), " dims");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   "router_topk: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= router::kMaxExperts, "router_topk: logits.size(1) (number of experts) must be in "
                    "[1, ", router::kMaxExperts, "], got ", E);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "router_topk: top_k must be in [1, E=", E, "], got ", top_k);
  // a single column (E == 1) has no stride(1) to honour: a transposed [1, T] row is fine, as in moe_permute
  TORCH_CHECK_VALUE(logits.size(0) == 0 || E <= 1 || logits.stride(1) == 1,
                    "router_topk: logits rows must be contiguous (stride(1) == 1), got strides ", logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) * top_k <= INT32_MAX, "router_topk: T * top_k = ", logits.size(0) * top_k,
                    " does not fit int32 (the slot ids downstream are int32)");
}

void check_router_topk_outputs(const at::Tensor& logits, int64_t top_k, const at::Tensor& weights,
                               const at::Tensor& ids) {
  const std::vector<int64_t> shape{logits.size(0), top_k};
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, "router_topk: out weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.sizes() == shape && weights.is_contiguous(), "router_topk: out weights must be a "
                    "contiguous ", at::IntArrayRef(shape), " tensor, got ", weights.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt, "router_topk: out ids must be int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.sizes() == shape && ids.is_contiguous(), "router_topk: out ids must be a contiguous ",
                    at::IntArrayRef(shape), " tensor, got ", ids.sizes());
  TORCH_CHECK_VALUE(weights.device() == logits.device() && ids.device() == logits.device(),
                    "router_topk: weights and ids must be on the device of logits (", logits.device(), ")");
}

namespace {

void router_topk_out_cpu(const at::Tensor& logits, int64_t top_k, bool renormalize, const at::Tensor& weights,
                         const at::Tensor& ids) {
  check_router_topk_args(logits, top_k);
  check_router_topk_outputs(logits, top_k, weights, ids);
  const int64_t T = logits.size(0), E = logits.size(1), k = top_k;
  if (T == 0) return;
  const int64_t row_stride = logits.stride(0);
  float* w = weights.data_ptr<float>();
  int32_t* id = ids.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_topk_cpu", [&] {
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    // ~64 rows per task: a row of 128 experts is ~1 us, so smaller grains would be all scheduling.
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> p(E);
      std::vector<uint64_t> keys(E);
      for (int64_t t = begin; t < end; ++t) {
        float* wt = w + t * k;
        int32_t* it = id + t * k;
        const bool nan_free = router::softmax_row(l + t * row_stride, static_cast<int>(E), p.data());
        if (k > 32) {
          // the GPU's algorithm: 64-bit keys, k rounds of argmax, for every row. A NaN row's keys all carry the NaN
          // image of order_bits, so their ~id low words pick experts 0..k-1, as select_topk_nan_row does.
          for (int64_t e = 0; e < E; ++e) keys[e] = router::topk_key(p[e], static_cast<int32_t>(e));
          router::select_topk_passes(keys.data(), static_cast<int>(E), static_cast<int>(k), wt, it);
        } else if (nan_free) {
          router::select_topk_row(p.data(), static_cast<int>(E), static_cast<int>(k), wt, it);
        } else {
          router::select_topk_nan_row(static_cast<int>(k), wt, it);
        }
        if (renormalize) router::renormalize_row(wt, static_cast<int>(k));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> router_topk_cpu(const at::Tensor& logits, int64_t top_k, bool renormalize) {
  check_router_topk_args(logits, top_k);
  auto weights = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kInt));
  router_topk_out_cpu(logits, top_k, renormalize, weights, ids);
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk.out", &router_topk_out_cpu);
}

}  // namespace qwen3moe
