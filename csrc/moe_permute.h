// moe_permute: the index arithmetic and the per-token combine shared by the CPU (moe_permute_cpu.cpp) and CUDA
// (moe_permute.cu) kernels of moe_sort, moe_align_block, moe_permute and moe_unpermute.
//
// Layout (see qwen3moe_kernels/reference.py): slot s = t * k + j is the j-th choice of token t; sorted_slots
// lists the slots grouped by expert, ascending slot id within an expert (a stable counting sort), offsets[E+1]
// the group starts, inv[s] the position of slot s. The block-padded variant rounds every expert's group up to a
// multiple of block_size; padding positions hold the sentinel T*k, which moe_permute turns into a zero row.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace qwen3moe::permute {

C10_HOST_DEVICE inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The padded length bound of moe_align_block: every expert wastes at most block_size - 1 positions, so
// T*k + E*(block_size-1) rounded up to block_size. Known from shapes alone, so no device->host sync.
C10_HOST_DEVICE inline int64_t padded_bound(int64_t numel, int64_t num_experts, int64_t block_size) {
  return round_up(numel + num_experts * (block_size - 1), block_size);
}

// Which expert's padded group holds position `pos` of moe_align_block's output: the last e with
// padded_offsets[e] <= pos (an empty expert's group has no positions, so equal offsets resolve to the next expert
// that has some), or -1 at and past padded_offsets[E] (positions in no group).
C10_HOST_DEVICE inline int32_t position_expert(const int32_t* padded_offsets, int E, int64_t pos) {
  if (pos >= padded_offsets[E]) return -1;
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (padded_offsets[mid] <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

// How many of the block_size positions starting at `start` (the first position of a block, which lies wholly in
// expert e's padded group; e from position_expert, -1 for a block in no group) hold slots: the group's slots come
// first, then its padding. The rest of the block holds the sentinel; the slot at a position p below that count
// is sorted_slots[offsets[e] + p - padded_offsets[e]].
C10_HOST_DEVICE inline int64_t block_slot_count(int64_t start, int32_t e, const int32_t* offsets,
                                                const int32_t* padded_offsets, int64_t block_size) {
  if (e < 0) return 0;
  const int64_t left = static_cast<int64_t>(offsets[e + 1] - offsets[e]) - (start - padded_offsets[e]);
  return left < 0 ? 0 : (left < block_size ? left : block_size);
}

// The token whose row slot `slot` gathers; -1 for the padding sentinel numel (a zero row).
C10_HOST_DEVICE inline int64_t slot_token(int64_t slot, int64_t top_k, int64_t numel) {
  return slot == numel ? -1 : slot / top_k;
}

C10_HOST_DEVICE inline float to_float(float v) { return v; }
C10_HOST_DEVICE inline float to_float(c10::Half v) { return static_cast<float>(v); }
C10_HOST_DEVICE inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// One step of the weighted combine: acc + w * y, rounded as the reference rounds it (the product is rounded to
// fp32 before the add: torch computes rows * weights, then sums over k). No fused multiply-add on either side,
// so CPU and GPU agree bit for bit and both match the reference's order j = 0..k-1.
C10_HOST_DEVICE inline float combine_step(float acc, float w, float y) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(acc, __fmul_rn(w, y));
#else
  return acc + w * y;  // setup.py builds with -ffp-contract=off: no fma contraction here either
#endif
}

// One row's contribution to the combine of N consecutive columns of a token: acc[i] += w * vals[i]. The caller
// visits the token's k rows in the order j = 0..k-1 starting from acc = 0 (CPU: N = a 64-column chunk; GPU: N =
// one 16-byte vector per thread), so both compute sum_j w[j] * y[inv[t*k+j]] with the same roundings.
template <int N, typename scalar_t>
C10_HOST_DEVICE inline void combine_row(float* acc, float w, const scalar_t* vals) {
  for (int i = 0; i < N; ++i) acc[i] = combine_step(acc[i], w, to_float(vals[i]));
}

}  // namespace qwen3moe::permute
