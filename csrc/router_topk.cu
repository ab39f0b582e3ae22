// router_topk on CUDA: one warp per row (4 rows per 128-thread block), the row held in registers.
//
// Each lane loads 16-byte vectors of the row (VEC = 4 fp32 or 8 bf16/fp16 values; a scalar variant serves rows
// that are not 16-byte aligned or whose E is not a multiple of VEC) at columns chunk*32*VEC + lane*VEC, so a warp
// reads contiguous 512 B (fp32) per chunk: coalesced. Softmax: a NaN-propagating warp max and a warp sum by
// __shfl_xor_sync butterflies. Top-k: every value becomes the 64-bit key of router_topk.h; k rounds of
// "lane-local max, then 5 xor-shuffles of the 64-bit max" give every lane the winning key, whose owner zeroes it.
// Lane j % 32 writes output j. No shared memory, no atomics, no host synchronisation (graph-capturable).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "router_topk.h"

namespace qwen3moe {

void check_router_topk_args(const at::Tensor& logits, int64_t top_k);
void check_router_topk_outputs(const at::Tensor& logits, int64_t top_k, const at::Tensor& weights,
                               const at::Tensor& ids);

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

// NC chunks of VEC values per lane: E <= NC * 32 * VEC.
template <typename scalar_t, int VEC, int NC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    router_topk_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t T, int E, int k,
                       bool renormalize, float* __restrict__ weights, int32_t* __restrict__ ids) {
  constexpr int P = NC * VEC;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= T) return;  // uniform per warp: the shuffles below always see 32 lanes
  const scalar_t* l = logits + row * row_stride;

  float v[P];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int e0 = c * 32 * VEC + lane * VEC;
    if (e0 < E) {  // the host guarantees E % VEC == 0, so the whole vector is in the row
      const Vec<scalar_t, VEC> x = *reinterpret_cast<const Vec<scalar_t, VEC>*>(l + e0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[c * VEC + i] = router::to_float(x.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[c * VEC + i] = -INFINITY;
    }
  }
  auto expert = [&](int i) { return (i / VEC) * 32 * VEC + lane * VEC + (i % VEC); };

  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (expert(i) < E) m = router::nan_max(m, v[i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = router::nan_max(m, __shfl_xor_sync(kFull, m, off));
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (expert(i) < E) s += router::exp_nonpos(v[i] - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  const float inv = 1.0f / s;

  uint64_t key[P];
#pragma unroll
  for (int i = 0; i < P; ++i)
    key[i] = expert(i) < E ? router::topk_key(router::softmax_prob(v[i], m, inv), expert(i)) : 0ull;

  float* w = weights + row * k;
  int32_t* id = ids + row * k;
  float wsum = 0.0f;
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
#pragma unroll
    for (int i = 0; i < P; ++i) best = key[i] > best ? key[i] : best;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const uint64_t o = __shfl_xor_sync(kFull, best, off);
      best = o > best ? o : best;
    }
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (key[i] == best) key[i] = 0;  // keys are unique: exactly one lane owns it
    const float p = router::key_prob(best);
    wsum += p;  // every lane sums in the order j = 0..k-1, as router::renorm_sum does on the CPU
    if ((j & 31) == lane) {
      w[j] = p;
      id[j] = router::key_id(best);
    }
  }
  if (renormalize) {
    // rereads only this lane's own writes. Walked by pointer so that only (pointer, end, wsum) stay live across the
    // IEEE division, whose slow path is a CALL: with (j, k, w) live, ptxas kept one of them in an 8 B stack slot.
    const float* const end = w + k;
    for (float* p = w + lane; p < end; p += 32) *p = *p / wsum;
  }
}

template <typename scalar_t, int VEC>
void launch_vec(const at::Tensor& logits, int64_t k, bool renormalize, const at::Tensor& weights,
                const at::Tensor& ids) {
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1));
  const int nc_needed = (E + 32 * VEC - 1) / (32 * VEC);
  const dim3 grid(static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarpsPerBlock * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto nc_tag) {
    constexpr int NC = decltype(nc_tag)::value;
    router_topk_kernel<scalar_t, VEC, NC><<<grid, block, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), T, E, static_cast<int>(k), renormalize,
        weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  };
  // at most 16 values per lane (E <= 512)
  if (nc_needed <= 1) go(std::integral_constant<int, 1>{});
  else if (nc_needed <= 2 && 2 * VEC <= 16) go(std::integral_constant<int, (2 * VEC <= 16) ? 2 : 1>{});
  else if (nc_needed <= 4 && 4 * VEC <= 16) go(std::integral_constant<int, (4 * VEC <= 16) ? 4 : 1>{});
  else if (nc_needed <= 8 && 8 * VEC <= 16) go(std::integral_constant<int, (8 * VEC <= 16) ? 8 : 1>{});
  else go(std::integral_constant<int, (16 * VEC <= 16) ? 16 : 1>{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void router_topk_out_cuda(const at::Tensor& logits, int64_t top_k, bool renormalize, const at::Tensor& weights,
                          const at::Tensor& ids) {
  check_router_topk_args(logits, top_k);
  check_router_topk_outputs(logits, top_k, weights, ids);
  TORCH_CHECK_VALUE(logits.is_cuda(), "router_topk: logits must be a CUDA tensor here, got ", logits.device());
  if (logits.size(0) == 0) return;
  c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_topk_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const int64_t E = logits.size(1);
    const bool aligned = reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0 &&
                         (logits.stride(0) * sizeof(scalar_t)) % 16 == 0 && E % VEC == 0;
    if (aligned) launch_vec<scalar_t, VEC>(logits, top_k, renormalize, weights, ids);
    else launch_vec<scalar_t, 1>(logits, top_k, renormalize, weights, ids);
  });
}

std::tuple<at::Tensor, at::Tensor> router_topk_cuda(const at::Tensor& logits, int64_t top_k, bool renormalize) {
  check_router_topk_args(logits, top_k);
  auto weights = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kInt));
  router_topk_out_cuda(logits, top_k, renormalize, weights, ids);
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CUDA, m) {
  m.impl("router_topk", &router_topk_cuda);
  m.impl("router_topk.out", &router_topk_out_cuda);
}

}  // namespace qwen3moe
