// Every qwen3moe op schema, defined once. Kernels register per device in <stem>_cpu.cpp / <stem>.cu; fake
// (meta) implementations and the public wrappers live in qwen3moe_kernels/ops/<stem>.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "grouped_swiglu.h"

namespace {
// _C.cpu_isa(): the path the C++ CPU experts kernel (grouped_swiglu_cpu.cpp) takes now, "avx512_bf16", "avx512",
// "avx2" or "generic", or "torch: <why>" where it hands the call to the torch implementation: the best this CPU
// has, or what QWEN3MOE_CPU_ISA names (ValueError for a path it cannot run or does not know). None where the build
// has no C++ CPU experts kernel (not x86-64).
PyObject* cpu_isa(PyObject*, PyObject*) {
#if defined(__x86_64__)
  try {
    const qwen3moe::experts::Path p = qwen3moe::experts::selected_path();
    if (p.torch != nullptr) return PyUnicode_FromString((std::string("torch: ") + p.torch).c_str());
    return PyUnicode_FromString(qwen3moe::experts::isa_name(p.isa));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA path of the C++ CPU experts kernel (None: no such kernel)."},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" {
// Importing qwen3moe_kernels._C runs the static TORCH_LIBRARY registrations below. The module carries one
// attribute, with_cuda (1 when the CUDA kernels were compiled in), so Python knows whether a CUDA tensor can use
// them or must fall back to the reference; cpu_experts (1 when grouped_swiglu's CPU kernel is the C++ one) and
// cpu_isa() (above).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef QWEN3MOE_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
#if defined(__x86_64__)
  PyModule_AddIntConstant(m, "cpu_experts", 1);  // grouped_swiglu has its C++ CPU kernel (grouped_swiglu_cpu.cpp)
#else
  PyModule_AddIntConstant(m, "cpu_experts", 0);
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

  // RMSNorm over the last dim of x [..., H] (fp32/fp16/bf16, rows may be strided, last dim contiguous): fp32 sum of
  // squares, normed = x * rsqrt(mean + eps) rounded to x's dtype, out = weight * normed in x's dtype (HF's
  // Qwen3MoeRMSNorm). weight [H] of x's dtype. Output contiguous. Autograd: rms_norm_backward.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // new_residual = residual + x (in x's dtype), out = rms_norm(new_residual): the decoder layer's add + norm.
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor new_residual)");
  // Gradients of rms_norm at x: grad_x (x's dtype, contiguous) and grad_weight (fp32 accumulation over rows in a
  // fixed order, so deterministic; weight's dtype).
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor grad_x, Tensor grad_weight)");
  // Rotate-half (neox) RoPE of q [B, S, Hq, D] and k [B, S, Hk, D] (strided views fine, last dim contiguous) with
  // cos, sin [B or 1, S, D] in q's dtype, computed in q's dtype as transformers' apply_rotary_pos_emb. Outputs
  // contiguous.
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  // rope with the table built in the kernel from position_ids [B or 1, S] (int32/int64, any values: KV-cache decode)
  // and inv_freq fp32 [D/2]: cos/sin(float(pos) * inv_freq) in fp32 rounded to q's dtype, as Qwen3MoeRotaryEmbedding.
  m.def("rope_positions(Tensor q, Tensor k, Tensor position_ids, Tensor inv_freq) -> (Tensor q_out, Tensor k_out)");
  // Qwen3 attention prologue in one pass: per-head RMSNorm of q and k over D with q_weight / k_weight [D], then rope.
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps) -> "
      "(Tensor q_out, Tensor k_out)");
  // qk_norm_rope with the rope table from position_ids and inv_freq (as rope_positions).
  m.def(
      "qk_norm_rope_positions(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor position_ids, "
      "Tensor inv_freq, float eps) -> (Tensor q_out, Tensor k_out)");
  // Backward of the four ops above (weights absent: no norm; cos/sin absent: position_ids + inv_freq). Returns the
  // input gradients of q and k and the weight gradients (deterministic fixed-order fp32 sums; empty [0] when the
  // weight is absent).
  m.def(
      "qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, "
      "Tensor? cos, Tensor? sin, Tensor? position_ids, Tensor? inv_freq, float eps) -> "
      "(Tensor grad_q_in, Tensor grad_k_in, Tensor grad_q_weight, Tensor grad_k_weight)");

  // The routed experts (a gated MLP per expert: act(gate) * up, then down). Slot s = t*k + j is token t's j-th choice
  // e = ids[t, j]; x [T, H], w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I], ids [T, k] int32/int64 in
  // [0, E), weights fp32 [T, k] (rounded to x's dtype before use, as transformers does); activation is "silu" (SwiGLU,
  // Qwen3's), "gelu" (erf), "gelu_tanh" or "relu". Kernels: CPU in C++ (grouped_swiglu_cpu.cpp), CUDA
  // registered by qwen3moe_kernels/ops/grouped_swiglu.py (docs/ops/grouped_swiglu.md). The whole forward: out [T, H] with the k slots summed in fp32 in
  // the order j = 0..k-1 (deterministic); h [T*k, I] and gate_up [T*k, 2I] (slot order, the backward's inputs) when
  // save_activations, else empty [0, ...].
  m.def(
      "grouped_swiglu(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor ids, Tensor weights, bool save_activations, "
      "str activation=\"silu\") -> (Tensor out, Tensor h, Tensor gate_up)");
  // The whole backward: the gradients asked for (need_*), each not asked for an empty [0, ...]; d_weights fp32 [T, k].
  m.def(
      "grouped_swiglu_backward(Tensor dout, Tensor x, Tensor h, Tensor gate_up, Tensor w_gate_up, Tensor w_down, "
      "Tensor ids, Tensor weights, bool need_dx=True, bool need_dw_gate_up=True, bool need_dw_down=True, "
      "str activation=\"silu\") -> (Tensor dx, Tensor d_w_gate_up, Tensor d_w_down, Tensor d_weights)");
  // The forward's parts: h = act(gate) * up per slot (gate_up [T*k, 2I] too when save_gate_up), then the down GEMM
  // with the routing weight and the fixed-order fp32 combine.
  m.def(
      "grouped_swiglu_gate_up(Tensor x, Tensor w_gate_up, Tensor ids, bool save_gate_up, str activation=\"silu\") -> "
      "(Tensor h, Tensor gate_up)");
  m.def("grouped_swiglu_down(Tensor h, Tensor w_down, Tensor ids, Tensor weights) -> Tensor out");
  // The backward's parts: through the down GEMM and the activation to d_gate_up [T*k, 2I] (and d_w_down, d_weights),
  // then through the gate/up GEMM to dx and d_w_gate_up; a weight gradient not asked for is an empty [0, ...].
  m.def(
      "grouped_swiglu_down_backward(Tensor dout, Tensor h, Tensor gate_up, Tensor w_down, Tensor ids, "
      "Tensor weights, bool need_weight_grad=True, str activation=\"silu\") -> "
      "(Tensor d_gate_up, Tensor d_w_down, Tensor d_weights)");
  m.def(
      "grouped_swiglu_gate_up_backward(Tensor d_gate_up, Tensor x, Tensor w_gate_up, Tensor ids, "
      "bool need_weight_grad=True) -> (Tensor dx, Tensor d_w_gate_up)");
}
