// Every qwen3moe op schema, defined once. Kernels register per device in <stem>_cpu.cpp / <stem>.cu; fake
// (meta) implementations and the public wrappers live in qwen3moe_kernels/ops/<stem>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing qwen3moe_kernels._C runs the static TORCH_LIBRARY registrations below. The module carries one
// attribute, with_cuda (1 when the CUDA kernels were compiled in), so Python knows whether a CUDA tensor can use
// them or must fall back to the reference.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef QWEN3MOE_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(qwen3moe, m) {
  // Router: fp32 softmax over the E experts of each row of logits [T, E] (fp32/bf16/fp16), top-k in the order
  // (probability desc, expert id asc; NaN largest), optional renormalisation of the k weights to sum 1.
  // Returns weights fp32 [T, k] and ids int32 [T, k]. E <= 512, 1 <= top_k <= E.
  m.def("router_topk(Tensor logits, int top_k, bool renormalize) -> (Tensor weights, Tensor ids)");
  // Out variant for preallocated (decode / CUDA-graph) buffers: weights fp32 [T, k], ids int32 [T, k].
  m.def("router_topk.out(Tensor logits, int top_k, bool renormalize, *, Tensor(a!) weights, Tensor(b!) ids) -> ()");
  // Stable sort of the T*k token-slots of ids [T, k] (int32/int64) by expert: sorted_slots int32 [T*k],
  // inv int32 [T*k] (position of each slot in that order), offsets int32 [E+1]. Ids outside [0, E) are an error.
  m.def("moe_sort(Tensor ids, int num_experts) -> (Tensor sorted_slots, Tensor inv, Tensor offsets)");
  // The sorted slots with each expert's group padded to a multiple of block_size, for block-tiled grouped GEMMs:
  // padded_slots int32 [P_max] (sentinel T*k in padding), block_expert int32 [P_max / block_size] (-1 past the
  // end), num_padded int32 [1]; P_max = round_up(T*k + E*(block_size-1), block_size), known without reading ids.
  m.def(
      "moe_align_block(Tensor ids, int num_experts, int block_size) -> "
      "(Tensor padded_slots, Tensor block_expert, Tensor num_padded)");
  // Gather rows of x [T, H] into expert order: out[i] = x[slots[i] // top_k], [len(slots), H]; the padding
  // sentinel T*top_k gives a zero row, so padded_slots from moe_align_block work too.
  m.def("moe_permute(Tensor x, Tensor sorted_slots, int top_k) -> Tensor");
  // Weighted combine back to token order: out[t] = sum_j weights[t, j] * y[inv[t*k + j]], fp32 accumulation in
  // the order j = 0..k-1 (deterministic, no atomics), output y.dtype [T, H]. weights fp32 [T, k].
  m.def("moe_unpermute(Tensor y, Tensor weights, Tensor inv) -> Tensor");
  // Out variant of moe_unpermute writing into a preallocated out [T, H] of y.dtype.
  m.def("moe_unpermute.out(Tensor y, Tensor weights, Tensor inv, *, Tensor(a!) out) -> ()");
}
