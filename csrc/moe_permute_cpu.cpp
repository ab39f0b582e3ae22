// moe_sort, moe_align_block, moe_permute, moe_unpermute on CPU.
//
// moe_sort is a parallel stable counting sort: the T*k slots are cut into a few contiguous chunks (one per
// thread); each chunk counts its experts, an exclusive scan over (expert, chunk) gives every chunk its first
// position per expert, and each chunk then scatters its slots in ascending order. The result is the unique
// stable order, whatever the number of threads (deterministic). permute copies rows; unpermute combines the k
// rows of each token in fp32 with the shared combine of moe_permute.h, one token per iteration of
// at::parallel_for, so no two threads write one output row (no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "moe_permute.h"
#include "moe_sort_cpu.h"

namespace qwen3moe {

void check_ids(const at::Tensor& ids, int64_t num_experts, const char* op) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                   ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.is_contiguous(), op, ": ids must be contiguous, got strides ", ids.strides());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= 512, op, ": num_experts must be in [1, 512], got ", num_experts);
  TORCH_CHECK_VALUE(ids.numel() <= INT32_MAX, op, ": ids.numel() = T*k = ", ids.numel(),
                    " does not fit int32 (slot ids are int32)");
}

void check_align_args(const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  check_ids(ids, num_experts, "moe_align_block");
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= 4096, "moe_align_block: block_size must be in [1, 4096], got ",
                    block_size);
  TORCH_CHECK_VALUE(permute::padded_bound(ids.numel(), num_experts, block_size) <= INT32_MAX,
                    "moe_align_block: the padded length T*k + E*(block_size-1) does not fit int32 (T*k = ", ids.numel(),
                    ")");
}

void check_permute_args(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  TORCH_CHECK_VALUE(x.dim() == 2, "moe_permute: x must be 2-D [T, H], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(x.size(0) == 0 || x.size(1) <= 1 || x.stride(1) == 1,
                    "moe_permute: x rows must be contiguous (stride(1) == 1), got strides ", x.strides());
  TORCH_CHECK_TYPE(sorted_slots.scalar_type() == at::kInt, "moe_permute: sorted_slots must be int32, got ",
                   sorted_slots.scalar_type());
  TORCH_CHECK_VALUE(sorted_slots.dim() == 1 && sorted_slots.is_contiguous(),
                    "moe_permute: sorted_slots must be a contiguous 1-D tensor, got shape ", sorted_slots.sizes());
  TORCH_CHECK_VALUE(top_k >= 1, "moe_permute: top_k must be >= 1, got ", top_k);
  TORCH_CHECK_VALUE(x.size(0) * top_k <= INT32_MAX, "moe_permute: T * top_k = ", x.size(0) * top_k,
                    " does not fit int32");
  TORCH_CHECK_VALUE(x.device() == sorted_slots.device(), "moe_permute: x and sorted_slots must be on one device, got ",
                    x.device(), " and ", sorted_slots.device());
}

void check_unpermute_args(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv) {
  TORCH_CHECK_VALUE(y.dim() == 2, "moe_unpermute: y must be 2-D [T*k, H], got ", y.dim(), " dims");
  TORCH_CHECK_TYPE(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf,
                   "moe_unpermute: y must be float32, bfloat16 or float16, got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.size(0) == 0 || y.size(1) <= 1 || y.stride(1) == 1,
                    "moe_unpermute: y rows must be contiguous (stride(1) == 1), got strides ", y.strides());
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, "moe_unpermute: weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.is_contiguous(),
                    "moe_unpermute: weights must be a contiguous [T, k] tensor, got shape ", weights.sizes());
  TORCH_CHECK_TYPE(inv.scalar_type() == at::kInt, "moe_unpermute: inv must be int32, got ", inv.scalar_type());
  TORCH_CHECK_VALUE(inv.dim() == 1 && inv.is_contiguous(), "moe_unpermute: inv must be a contiguous 1-D tensor, got "
                    "shape ", inv.sizes());
  TORCH_CHECK_VALUE(inv.numel() == weights.numel(), "moe_unpermute: inv must have T*k = ", weights.numel(),
                    " entries (weights is ", weights.sizes(), "), got ", inv.numel());
  TORCH_CHECK_VALUE(weights.size(1) >= 1, "moe_unpermute: weights must have k >= 1 columns");
  TORCH_CHECK_VALUE(y.device() == weights.device() && y.device() == inv.device(),
                    "moe_unpermute: y, weights and inv must be on one device, got ", y.device(), ", ", weights.device(),
                    ", ", inv.device());
}

void check_unpermute_out(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& out) {
  const std::vector<int64_t> shape{weights.size(0), y.size(1)};
  TORCH_CHECK_TYPE(out.scalar_type() == y.scalar_type(), "moe_unpermute: out must be ", y.scalar_type(), " (y's "
                   "dtype), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == shape && out.is_contiguous() && out.device() == y.device(),
                    "moe_unpermute: out must be a contiguous ", at::IntArrayRef(shape), " tensor on ", y.device(),
                    ", got ", out.sizes(), " on ", out.device());
}

template <typename id_t>
void counting_sort(const id_t* ids, int64_t N, int64_t E, int32_t* sorted, int32_t* inv, int32_t* offsets) {
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 16383) / 16384));
  std::vector<int32_t> base(nchunks * E, 0);
  std::vector<int64_t> bad(nchunks, -1);  // first out-of-range slot per chunk
  auto chunk_begin = [&](int64_t c) { return N * c / nchunks; };
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int32_t* h = base.data() + c * E;
      for (int64_t s = chunk_begin(c); s < chunk_begin(c + 1); ++s) {
        const int64_t e = ids[s];
        if (e < 0 || e >= E) {
          bad[c] = s;
          break;
        }
        ++h[e];
      }
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    TORCH_CHECK_VALUE(bad[c] < 0, "ids: expert id ", static_cast<int64_t>(ids[bad[c]]), " at flat position ", bad[c],
                      " is out of range [0, num_experts=", E, ")");
  }
  // exclusive scan in (expert, chunk) order: chunk c's first position for expert e
  int32_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = run;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int32_t n = base[c * E + e];
      base[c * E + e] = run;
      run += n;
    }
  }
  offsets[E] = run;
  if (sorted == nullptr) return;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int32_t* pos = base.data() + c * E;
      for (int64_t s = chunk_begin(c); s < chunk_begin(c + 1); ++s) {
        const int32_t p = pos[ids[s]]++;
        sorted[p] = static_cast<int32_t>(s);
        if (inv != nullptr) inv[s] = p;
      }
    }
  });
}

template void counting_sort<int32_t>(const int32_t*, int64_t, int64_t, int32_t*, int32_t*, int32_t*);
template void counting_sort<int64_t>(const int64_t*, int64_t, int64_t, int32_t*, int32_t*, int32_t*);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_cpu(const at::Tensor& ids, int64_t num_experts) {
  check_ids(ids, num_experts, "moe_sort");
  const int64_t N = ids.numel();
  auto opt = ids.options().dtype(at::kInt);
  auto sorted = at::empty({N}, opt), inv = at::empty({N}, opt), offsets = at::empty({num_experts + 1}, opt);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_sort_cpu", [&] {
    counting_sort(ids.const_data_ptr<index_t>(), N, num_experts, sorted.data_ptr<int32_t>(), inv.data_ptr<int32_t>(),
                  offsets.data_ptr<int32_t>());
  });
  return {sorted, inv, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_cpu(const at::Tensor& ids, int64_t num_experts,
                                                                   int64_t block_size) {
  check_align_args(ids, num_experts, block_size);
  const int64_t N = ids.numel(), E = num_experts, B = block_size;
  const int64_t p_max = permute::padded_bound(N, E, B);
  auto opt = ids.options().dtype(at::kInt);
  auto padded = at::empty({p_max}, opt), block_expert = at::empty({p_max / B}, opt), num_padded = at::empty({1}, opt);
  std::vector<int32_t> sorted(N), offsets(E + 1);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_align_block_cpu", [&] {
    counting_sort(ids.const_data_ptr<index_t>(), N, E, sorted.data(), nullptr, offsets.data());
  });
  std::vector<int32_t> padded_offsets(E + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    padded_offsets[e + 1] = padded_offsets[e] + static_cast<int32_t>(permute::round_up(offsets[e + 1] - offsets[e], B));
  // block by block, with the index arithmetic the CUDA kernel uses (align_fill_kernel), so the CPU tests cover
  // it: each block's expert, its slots copied, the sentinel after them
  int32_t* pad = padded.data_ptr<int32_t>();
  int32_t* be = block_expert.data_ptr<int32_t>();
  const int32_t* po = padded_offsets.data();
  const int64_t used = padded_offsets[E] / B;  // the blocks past these are in no group: expert -1, all sentinel
  for (int64_t b = 0; b < used; ++b) {
    const int64_t start = b * B;
    const int32_t e = permute::position_expert(po, static_cast<int>(E), start);
    const int64_t n = permute::block_slot_count(start, e, offsets.data(), po, B);
    be[b] = e;
    if (n > 0) std::memcpy(pad + start, sorted.data() + offsets[e] + (start - po[e]), n * sizeof(int32_t));
    std::fill(pad + start + n, pad + start + B, static_cast<int32_t>(N));
  }
  std::fill(be + used, be + p_max / B, -1);
  std::fill(pad + used * B, pad + p_max, static_cast<int32_t>(N));
  num_padded.data_ptr<int32_t>()[0] = padded_offsets[E];
  return {padded, block_expert, num_padded};
}

at::Tensor moe_permute_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  check_permute_args(x, sorted_slots, top_k);
  const int64_t T = x.size(0), H = x.size(1), N = sorted_slots.numel(), numel = T * top_k;
  auto out = at::empty({N, H}, x.options());
  const int32_t* slots = sorted_slots.const_data_ptr<int32_t>();
  const int64_t row_bytes = H * x.element_size();
  const int64_t x_stride_bytes = (T > 0 ? x.stride(0) : H) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  std::atomic<int64_t> bad{-1};
  // rows are 4 KB at H=2048 bf16: ~16 rows per task amortises the scheduling
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t s = slots[i];
      if (s < 0 || s > numel) {
        bad.store(i);
        return;
      }
      const int64_t t = permute::slot_token(s, top_k, numel);
      if (t < 0) {
        std::memset(dst + i * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(dst + i * row_bytes, src + t * x_stride_bytes, row_bytes);
      }
    }
  });
  const int64_t b = bad.load();
  TORCH_CHECK_VALUE(b < 0, "moe_permute: sorted_slots[", b, "] = ", b >= 0 ? slots[b] : 0,
                    " is out of range [0, T*top_k = ", numel, "] (T*top_k itself marks a padding row)");
  return out;
}

void moe_unpermute_out_cpu(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv,
                           const at::Tensor& out) {
  check_unpermute_args(y, weights, inv);
  check_unpermute_out(y, weights, out);
  const int64_t T = weights.size(0), k = weights.size(1), M = y.size(0), H = y.size(1);
  const int32_t* iv = inv.const_data_ptr<int32_t>();
  for (int64_t s = 0; s < T * k; ++s) {  // cheap next to the combine; an out-of-range row would be a wild read
    TORCH_CHECK_VALUE(iv[s] >= 0 && iv[s] < M, "moe_unpermute: inv[", s, "] = ", iv[s],
                      " is out of range [0, y.size(0) = ", M, ")");
  }
  if (T == 0 || H == 0) return;
  const float* w = weights.const_data_ptr<float>();
  const int64_t ys = y.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_unpermute_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int C = 64;  // columns per combine: the fp32 accumulators stay in registers / L1
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * k, 1)), [&](int64_t b, int64_t e) {
      float acc[C];
      for (int64_t t = b; t < e; ++t) {
        const float* wt = w + t * k;
        const int32_t* it = iv + t * k;
        scalar_t* ot = op + t * H;
        int64_t c0 = 0;
        for (; c0 + C <= H; c0 += C) {
          for (int i = 0; i < C; ++i) acc[i] = 0.0f;
          for (int64_t j = 0; j < k; ++j) permute::combine_row<C>(acc, wt[j], yp + it[j] * ys + c0);
          for (int i = 0; i < C; ++i) ot[c0 + i] = static_cast<scalar_t>(acc[i]);
        }
        for (; c0 < H; ++c0) {
          acc[0] = 0.0f;
          for (int64_t j = 0; j < k; ++j) permute::combine_row<1>(acc, wt[j], yp + it[j] * ys + c0);
          ot[c0] = static_cast<scalar_t>(acc[0]);
        }
      }
    });
  });
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv) {
  check_unpermute_args(y, weights, inv);
  auto out = at::empty({weights.size(0), y.size(1)}, y.options());
  moe_unpermute_out_cpu(y, weights, inv, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CPU, m) {
  m.impl("moe_sort", &moe_sort_cpu);
  m.impl("moe_align_block", &moe_align_block_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute.out", &moe_unpermute_out_cpu);
}

}  // namespace qwen3moe
