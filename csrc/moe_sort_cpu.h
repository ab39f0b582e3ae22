// The stable counting sort of the T*k slots by expert, on CPU (moe_permute_cpu.cpp; the experts forward's
// grouping uses it too). CPU only: moe_permute.h is also compiled by nvcc.
#pragma once

#include <cstdint>

namespace qwen3moe {

// The slots s = 0..N-1 in expert order, each expert's in ascending s (the unique stable order, whatever the
// thread count): sorted[i] the slot at position i, inv[s] the position of slot s, offsets[E + 1] where each
// expert's run starts. sorted and inv may be null (not wanted). An id outside [0, E) is a c10 ValueError.
// Instantiated for int32_t and int64_t ids.
template <typename id_t>
void counting_sort(const id_t* ids, int64_t N, int64_t E, int32_t* sorted, int32_t* inv, int32_t* offsets);

}  // namespace qwen3moe
