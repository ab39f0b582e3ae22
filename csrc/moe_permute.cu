// moe_sort, moe_align_block, moe_permute, moe_unpermute on CUDA. Nothing here synchronises with the host, so
// the decode path can be captured in a CUDA graph: every buffer size follows from shapes (P_max is a bound).
//
// Stable counting sort in three kernels over chunks of kChunk consecutive slots, one warp per chunk:
//   1. histogram: each warp counts its chunk's experts in shared memory (integer atomics: order-free, so the
//      counts are deterministic) and writes them to hist[chunk][E]; expert ids outside [0, E) trip a device
//      assertion;
//   2. scan (one block, one thread per expert): hist becomes each chunk's first position within its expert, the
//      per-expert totals are scanned into offsets[E+1] (and, for the padded variant, the block-rounded totals
//      into padded offsets and num_padded);
//   3. scatter: each warp walks its chunk 32 slots at a time in slot order; __match_any_sync groups the lanes
//      holding the same expert, a lane's rank in its group is the popcount of the lower lanes, and the group's
//      lowest lane advances the expert's running position: ascending slot order within an expert (stable).
// A fourth kernel labels each padded block with its expert by binary search over the padded offsets.
// permute: one block per output row, 16-byte vector copies (narrower units when rows are not 16-byte aligned).
// unpermute: one block per token, each thread owns one 16-byte vector of columns and sums its k rows in fp32 in
// the order j = 0..k-1 with the shared combine_row (moe_permute.h): deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe_permute.h"

namespace qwen3moe {

void check_ids(const at::Tensor& ids, int64_t num_experts, const char* op);
void check_align_args(const at::Tensor& ids, int64_t num_experts, int64_t block_size);
void check_permute_args(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k);
void check_unpermute_args(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv);
void check_unpermute_out(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& out);

namespace {

constexpr int kChunk = 2048;  // slots per warp in the sort kernels (64 rounds of 32)
constexpr int kSortWarps = 4;
constexpr int kMaxE = 512;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <typename id_t>
__global__ void __launch_bounds__(kSortWarps * 32)
    sort_hist_kernel(const id_t* __restrict__ ids, int64_t N, int E, int64_t nchunks, int32_t* __restrict__ hist) {
  __shared__ int32_t cnt[kSortWarps][kMaxE];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  if (chunk >= nchunks) return;
  for (int e = lane; e < E; e += 32) cnt[warp][e] = 0;
  __syncwarp();
  const int64_t begin = chunk * kChunk, end = min(N, begin + kChunk);
  for (int64_t s = begin + lane; s < end; s += 32) {
    const int64_t e = ids[s];
    CUDA_KERNEL_ASSERT_MSG(e >= 0 && e < E, "moe_sort / moe_align_block: expert id out of range [0, num_experts)");
    if (e >= 0 && e < E) atomicAdd(&cnt[warp][e], 1);  // never write outside cnt, even with asserts disabled
  }
  __syncwarp();
  for (int e = lane; e < E; e += 32) hist[chunk * E + e] = cnt[warp][e];
}

// Exclusive scan of v over the block's kMaxE threads (Hillis-Steele in shared memory); returns the total.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t* buf, int32_t* out_exclusive) {
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int off = 1; off < kMaxE; off <<= 1) {
    const int32_t add = t >= off ? buf[t - off] : 0;
    __syncthreads();
    buf[t] += add;
    __syncthreads();
  }
  *out_exclusive = buf[t] - v;
  const int32_t total = buf[kMaxE - 1];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kMaxE)
    sort_scan_kernel(int32_t* __restrict__ hist, int64_t nchunks, int E, int block_size,
                     int32_t* __restrict__ offsets, int32_t* __restrict__ padded_offsets,
                     int32_t* __restrict__ num_padded) {
  __shared__ int32_t buf[kMaxE];
  const int e = threadIdx.x;
  int32_t count = 0;
  if (e < E) {
    for (int64_t c = 0; c < nchunks; ++c) {  // coalesced across experts
      const int32_t n = hist[c * E + e];
      hist[c * E + e] = count;
      count += n;
    }
  }
  int32_t off;
  const int32_t total = block_exclusive_scan(count, buf, &off);
  if (e < E) offsets[e] = off;
  if (e == 0) offsets[E] = total;
  if (padded_offsets != nullptr) {
    const int32_t pc = e < E ? static_cast<int32_t>(permute::round_up(count, block_size)) : 0;
    int32_t poff;
    const int32_t ptotal = block_exclusive_scan(pc, buf, &poff);
    if (e < E) padded_offsets[e] = poff;
    if (e == 0) {
      padded_offsets[E] = ptotal;
      num_padded[0] = ptotal;
    }
  }
}

template <typename id_t>
__global__ void __launch_bounds__(kSortWarps * 32)
    sort_scatter_kernel(const id_t* __restrict__ ids, int64_t N, int E, int64_t nchunks,
                        const int32_t* __restrict__ hist, const int32_t* __restrict__ offsets,
                        const int32_t* __restrict__ padded_offsets, int32_t* __restrict__ sorted,
                        int32_t* __restrict__ inv, int32_t* __restrict__ padded) {
  __shared__ int32_t run[kSortWarps][kMaxE];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  if (chunk >= nchunks) return;
  for (int e = lane; e < E; e += 32) run[warp][e] = offsets[e] + hist[chunk * E + e];
  __syncwarp();
  const int64_t begin = chunk * kChunk, end = min(N, begin + kChunk);
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t s = base + lane;
    // the tail's idle lanes form their own group; out-of-range ids (asserted in the histogram) are skipped
    const int64_t e64 = s < end ? static_cast<int64_t>(ids[s]) : -1;
    const int e = (e64 >= 0 && e64 < E) ? static_cast<int>(e64) : -1;
    const bool valid = e >= 0;
    const unsigned group = __match_any_sync(kFull, e);
    int32_t pos = 0;
    if (valid) pos = run[warp][e] + __popc(group & lower);
    __syncwarp();
    if (valid && (group & lower) == 0) run[warp][e] += __popc(group);  // the group's lowest lane advances it
    __syncwarp();
    if (valid) {
      if (sorted != nullptr) sorted[pos] = static_cast<int32_t>(s);
      if (inv != nullptr) inv[s] = pos;
      if (padded != nullptr) padded[padded_offsets[e] + (pos - offsets[e])] = static_cast<int32_t>(s);
    }
  }
}

// One thread per position of the padded order, after the scatter: the sentinel where no slot landed (the scatter
// writes only real positions, so the two never touch the same element) and, at each block's first position,
// block_expert. Replaces a separate fill of the whole buffer: one launch and P_max writes fewer per alignment.
__global__ void align_fill_kernel(const int32_t* __restrict__ offsets, const int32_t* __restrict__ padded_offsets,
                                  int E, int block_size, int64_t p_max, int32_t sentinel,
                                  int32_t* __restrict__ padded, int32_t* __restrict__ block_expert) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= p_max) return;
  const int64_t start = pos - pos % block_size;  // every position of a block belongs to one expert's group
  const int32_t e = permute::position_expert(padded_offsets, E, start);
  if (pos == start) block_expert[pos / block_size] = e;
  if (pos - start >= permute::block_slot_count(start, e, offsets, padded_offsets, block_size)) padded[pos] = sentinel;
}

// Runs the three sort kernels. sorted/inv/padded/padded_offsets/num_padded may be null.
void run_sort(const at::Tensor& ids, int64_t E, int64_t block_size, int32_t* sorted, int32_t* inv, int32_t* offsets,
              int32_t* padded, int32_t* padded_offsets, int32_t* num_padded) {
  const int64_t N = ids.numel();
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  auto hist = at::empty({nchunks * E}, ids.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>((nchunks + kSortWarps - 1) / kSortWarps);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_sort_cuda", [&] {
    const index_t* ip = ids.const_data_ptr<index_t>();
    sort_hist_kernel<index_t><<<grid, kSortWarps * 32, 0, stream>>>(ip, N, static_cast<int>(E), nchunks,
                                                                     hist.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sort_scan_kernel<<<1, kMaxE, 0, stream>>>(hist.data_ptr<int32_t>(), nchunks, static_cast<int>(E),
                                              static_cast<int>(block_size), offsets, padded_offsets, num_padded);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sort_scatter_kernel<index_t><<<grid, kSortWarps * 32, 0, stream>>>(
        ip, N, static_cast<int>(E), nchunks, hist.data_ptr<int32_t>(), offsets, padded_offsets, sorted, inv, padded);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_cuda(const at::Tensor& ids, int64_t num_experts) {
  check_ids(ids, num_experts, "moe_sort");
  c10::cuda::CUDAGuard guard(ids.device());
  const int64_t N = ids.numel();
  auto opt = ids.options().dtype(at::kInt);
  auto sorted = at::empty({N}, opt), inv = at::empty({N}, opt);
  if (N == 0) return {sorted, inv, at::zeros({num_experts + 1}, opt)};
  auto offsets = at::empty({num_experts + 1}, opt);
  run_sort(ids, num_experts, 1, sorted.data_ptr<int32_t>(), inv.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
           nullptr, nullptr, nullptr);
  return {sorted, inv, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_cuda(const at::Tensor& ids, int64_t num_experts,
                                                                    int64_t block_size) {
  check_align_args(ids, num_experts, block_size);
  c10::cuda::CUDAGuard guard(ids.device());
  const int64_t N = ids.numel(), E = num_experts, B = block_size;
  const int64_t p_max = permute::padded_bound(N, E, B), nblocks = p_max / B;
  auto opt = ids.options().dtype(at::kInt);
  if (N == 0) return {at::full({p_max}, N, opt), at::full({nblocks}, -1, opt), at::zeros({1}, opt)};
  auto padded = at::empty({p_max}, opt), block_expert = at::empty({nblocks}, opt), num_padded = at::empty({1}, opt);
  auto offsets = at::empty({E + 1}, opt), padded_offsets = at::empty({E + 1}, opt);
  run_sort(ids, E, B, nullptr, nullptr, offsets.data_ptr<int32_t>(), padded.data_ptr<int32_t>(),
           padded_offsets.data_ptr<int32_t>(), num_padded.data_ptr<int32_t>());
  const int threads = 256;
  align_fill_kernel<<<static_cast<unsigned>((p_max + threads - 1) / threads), threads, 0,
                      at::cuda::getCurrentCUDAStream()>>>(offsets.data_ptr<int32_t>(), padded_offsets.data_ptr<int32_t>(),
                                                          static_cast<int>(E), static_cast<int>(B), p_max,
                                                          static_cast<int32_t>(N), padded.data_ptr<int32_t>(),
                                                          block_expert.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {padded, block_expert, num_padded};
}

// ------------------------------------------------------------------------------------------------- permute

template <typename U>
__global__ void __launch_bounds__(128)
    permute_kernel(const char* __restrict__ x, int64_t x_stride_bytes, const int32_t* __restrict__ slots,
                   int64_t top_k, int64_t numel, int64_t units_per_row, char* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t s = slots[i];
  CUDA_KERNEL_ASSERT_MSG(s >= 0 && s <= numel, "moe_permute: slot out of range [0, T*top_k]");
  if (s < 0 || s > numel) return;
  const int64_t t = permute::slot_token(s, top_k, numel);
  U* dst = reinterpret_cast<U*>(out + i * units_per_row * sizeof(U));
  if (t < 0) {
    U zero;
    memset(&zero, 0, sizeof(U));
    for (int64_t u = threadIdx.x; u < units_per_row; u += blockDim.x) dst[u] = zero;
    return;
  }
  const U* src = reinterpret_cast<const U*>(x + t * x_stride_bytes);
  for (int64_t u = threadIdx.x; u < units_per_row; u += blockDim.x) dst[u] = src[u];
}

at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  check_permute_args(x, sorted_slots, top_k);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), H = x.size(1), N = sorted_slots.numel();
  auto out = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) return out;
  TORCH_CHECK_VALUE(N <= INT32_MAX, "moe_permute: sorted_slots has more than 2^31-1 entries");
  const int64_t row_bytes = H * x.element_size();
  const int64_t stride_bytes = (T > 0 ? x.stride(0) : H) * x.element_size();
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto unit) {
    using U = decltype(unit);
    permute_kernel<U><<<static_cast<unsigned>(N), 128, 0, stream>>>(
        static_cast<const char*>(x.const_data_ptr()), stride_bytes, sorted_slots.const_data_ptr<int32_t>(), top_k,
        T * top_k, row_bytes / static_cast<int64_t>(sizeof(U)), static_cast<char*>(out.data_ptr()));
  };
  auto fits = [&](int64_t a) { return row_bytes % a == 0 && stride_bytes % a == 0 && addr % a == 0; };
  if (fits(16)) go(uint4{});
  else if (fits(4)) go(uint32_t{});
  else if (fits(2)) go(uint16_t{});
  else go(uint8_t{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ----------------------------------------------------------------------------------------------- unpermute

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(256)
    unpermute_kernel(const scalar_t* __restrict__ y, int64_t y_stride, int64_t M, const float* __restrict__ weights,
                     const int32_t* __restrict__ inv, int k, int64_t H, scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t* it = inv + t * k;
  const float* wt = weights + t * k;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < H; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t r = it[j];
      CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < M, "moe_unpermute: inv out of range [0, y.size(0))");
      if (r < 0 || r >= M) continue;
      const Vec<scalar_t, VEC> v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + r * y_stride + c);
      permute::combine_row<VEC>(acc, wt[j], v.v);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + t * H + c) = o;
  }
}

void moe_unpermute_out_cuda(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv,
                            const at::Tensor& out) {
  check_unpermute_args(y, weights, inv);
  check_unpermute_out(y, weights, out);
  c10::cuda::CUDAGuard guard(y.device());
  const int64_t T = weights.size(0), k = weights.size(1), M = y.size(0), H = y.size(1);
  if (T == 0 || H == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_unpermute_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const bool aligned = H % VEC == 0 && (M == 0 || y.stride(0) % VEC == 0) &&
                         reinterpret_cast<uintptr_t>(y.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
    const int64_t ys = M > 0 ? y.stride(0) : H;
    if (aligned) {
      unpermute_kernel<scalar_t, VEC><<<static_cast<unsigned>(T), 256, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), ys, M, weights.const_data_ptr<float>(), inv.const_data_ptr<int32_t>(),
          static_cast<int>(k), H, out.data_ptr<scalar_t>());
    } else {
      unpermute_kernel<scalar_t, 1><<<static_cast<unsigned>(T), 256, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), ys, M, weights.const_data_ptr<float>(), inv.const_data_ptr<int32_t>(),
          static_cast<int>(k), H, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inv) {
  check_unpermute_args(y, weights, inv);
  auto out = at::empty({weights.size(0), y.size(1)}, y.options());
  moe_unpermute_out_cuda(y, weights, inv, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CUDA, m) {
  m.impl("moe_sort", &moe_sort_cuda);
  m.impl("moe_align_block", &moe_align_block_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute.out", &moe_unpermute_out_cuda);
}

}  // namespace qwen3moe
