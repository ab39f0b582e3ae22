// qwen3moe::grouped_swiglu on CPU: the experts forward in C++ (the torch implementation in
// qwen3moe_kernels/ops/grouped_swiglu_cpu.py stays as the reference it is tested against).
//
// This file: the argument checks (the messages and exception types of ops/grouped_swiglu.py), the grouping of the
// T*k slots by expert (a stable counting sort), the work split and the threads, and the ISA choice. The arithmetic
// is in the per-ISA kernels (grouped_swiglu_cpu_<isa>.cpp from grouped_swiglu_cpu_impl.h, each compiled with its own
// -m flags), chosen at run time from cpuid: avx512_bf16 > avx512 > avx2, and the torch implementation where the CPU
// has none of these (the scalar generic kernel is slower there); QWEN3MOE_CPU_ISA forces a lower one, generic or
// torch. Two parallel regions: gate_up over (hit expert x column block of I), then down over column blocks of H,
// each block covering every hit expert and ending with the fp32 combine of the k slots of its columns. Every thread
// torch.get_num_threads() allows gets a contiguous share of estimated cost, so a decode step with 8 hit experts uses
// them all. No output depends on the split: results are bit-identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "grouped_swiglu.h"
#include "moe_sort_cpu.h"

namespace qwen3moe::experts {

// ---------------------------------------------------------------------------------------------- the ISA

#if defined(__x86_64__)
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// The best path this CPU runs: every instruction set its kernels are compiled with, and the OS saving the registers.
Isa detect_isa() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::generic;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return Isa::generic;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Isa::generic;  // SSE and AVX state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::generic;
  const bool avx2 = b & (1u << 5), f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!(avx2 && fma && f16c)) return Isa::generic;
  if ((xcr0 & 0xE6) != 0xE6 || !(f && dq && bw && vl)) return Isa::avx2;  // opmask and ZMM state
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  return (a1 & (1u << 5)) ? Isa::avx512_bf16 : Isa::avx512;
}

const Kernels& kernels_of(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return kernels_avx512_bf16();
    case Isa::avx512: return kernels_avx512();
    case Isa::avx2: return kernels_avx2();
    default: return kernels_generic();
  }
}

}  // namespace

Path selected_path() {
  static const Isa best = detect_isa();
  const char* env = std::getenv("QWEN3MOE_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    // the generic kernel is scalar (one lane): per-expert BLAS products, vectorised for whatever the CPU has, are
    // 1.1-1.8x faster even on MKL's SSE2 path (measured, docs/ops/grouped_swiglu.md "CPU")
    if (best == Isa::generic) return {best, "no AVX2/FMA/F16C, where the scalar generic kernel is slower"};
    return {best, nullptr};
  }
  const std::string want(env);
  if (want == "torch") return {best, "QWEN3MOE_CPU_ISA=torch"};
  for (Isa i : {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16}) {
    if (want == isa_name(i)) {
      TORCH_CHECK_VALUE(static_cast<int>(i) <= static_cast<int>(best), "QWEN3MOE_CPU_ISA=", want,
                        " asks for a path this CPU cannot run: it supports at most ", isa_name(best));
      return {i, nullptr};
    }
  }
  TORCH_CHECK_VALUE(false, "QWEN3MOE_CPU_ISA=", want, " is not one of torch, generic, avx2, avx512, avx512_bf16");
  return {best, nullptr};
}

// ------------------------------------------------------------------------------------------------ checks

namespace {

// torch's Python names, as the Python checks print dtypes
std::string py_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

constexpr const char* kOp = "grouped_swiglu";

void check_like(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " must have x's dtype ",
                   py_dtype(x.scalar_type()), ", got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), ", expected x's device ",
                    x.device());
}

// _check_experts + _check_activation of ops/grouped_swiglu.py, in the same order with the same messages.
Act check_args(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& ids,
               const at::Tensor& weights, c10::string_view activation) {
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, kOp,
                   ": x must be float32/float16/bfloat16, got ", py_dtype(xt));
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D, got shape ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1);
  check_like("w_gate_up", w_gate_up, x);
  TORCH_CHECK_VALUE(w_gate_up.dim() == 3 && w_gate_up.size(2) == H && w_gate_up.size(1) % 2 == 0 &&
                        w_gate_up.size(1) > 0,
                    kOp, ": w_gate_up must be [E, 2I, H=", H, "], got ", w_gate_up.sizes());
  const int64_t E = w_gate_up.size(0), I = w_gate_up.size(1) / 2;
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, kOp,
                   ": ids must be int32/int64, got ", py_dtype(ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.device() == x.device(), kOp, ": ids is on ", ids.device(), ", expected x's device ",
                    x.device());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == T, kOp, ": ids must be [T=", T, ", top_k], got ", ids.sizes());
  const int64_t k = ids.size(1);
  TORCH_CHECK_VALUE(1 <= k && k <= E, kOp, ": top_k (ids.shape[1]) must be in [1, E=", E, "], got ", k);
  if (ids.numel() > 0) {  // the first position of the smallest bad value, or else of the largest
    const at::Tensor ic = ids.contiguous();
    AT_DISPATCH_INDEX_TYPES(ic.scalar_type(), "grouped_swiglu_ids", [&] {
      const index_t* p = ic.const_data_ptr<index_t>();
      const index_t* end = p + ic.numel();
      const auto [lo, hi] = std::minmax_element(p, end);
      if (*lo < 0 || *hi >= E) {
        const index_t bad = *lo < 0 ? *lo : *hi;
        const int64_t pos = std::find(p, end, bad) - p;
        TORCH_CHECK_VALUE(false, kOp, ": ids[", pos / k, ", ", pos % k, "] = ", static_cast<int64_t>(bad),
                          " is not an expert id in [0, E=", E, ")");
      }
    });
  }
  check_like("w_down", w_down, x);
  TORCH_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) == E && w_down.size(1) == H && w_down.size(2) == I, kOp,
                    ": w_down must be [E=", E, ", H=", H, ", I=", I, "] (from x and w_gate_up), got ",
                    w_down.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, kOp, ": weights must be float32, got ",
                   py_dtype(weights.scalar_type()));
  TORCH_CHECK_VALUE(weights.device() == x.device(), kOp, ": weights is on ", weights.device(),
                    ", expected x's device ", x.device());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == T && weights.size(1) == k, kOp,
                    ": weights must be [T=", T, ", k=", k, "], got ", weights.sizes());
  if (activation == "silu") return Act::silu;
  if (activation == "gelu") return Act::gelu;
  if (activation == "gelu_tanh") return Act::gelu_tanh;
  if (activation == "relu") return Act::relu;
  TORCH_CHECK_VALUE(false, kOp, ": activation must be one of ('silu', 'gelu', 'gelu_tanh', 'relu'), got '",
                    std::string(activation), "'");
  return Act::silu;
}

// -------------------------------------------------------------------------------------------- the split

// Contiguous ranges of items, one per thread, of about equal total cost: thread t runs [first[t], first[t+1]).
std::vector<int64_t> split_by_cost(const std::vector<double>& cost, int64_t nt) {
  std::vector<double> prefix(cost.size() + 1, 0.0);
  for (size_t i = 0; i < cost.size(); ++i) prefix[i + 1] = prefix[i] + cost[i];
  std::vector<int64_t> first(nt + 1, static_cast<int64_t>(cost.size()));
  first[0] = 0;
  for (int64_t t = 1; t < nt; ++t) {
    const double target = prefix.back() * static_cast<double>(t) / static_cast<double>(nt);
    // the first item whose midpoint lies past the target
    int64_t i = first[t - 1];
    while (i < static_cast<int64_t>(cost.size()) && prefix[i] + 0.5 * cost[i] < target) ++i;
    first[t] = i;
  }
  return first;
}

template <class F>
void run_threads(int64_t nt, F&& f) {
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t);
  });
}

struct GateUpItem {
  int64_t hit, c0, c1;
};

template <class T>
void round_weights(const float* w, float* rw, int64_t n) {
  for (int64_t i = 0; i < n; ++i) rw[i] = round_to<T>(w[i]);
}

}  // namespace

// -------------------------------------------------------------------------------------------------- the op

namespace {

// The torch implementation, as its two parts ops (registered from Python, ops/grouped_swiglu.py): gate_up then
// down give what its whole forward gives, bit for bit (tests/test_grouped_swiglu.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> torch_forward(const at::Tensor& x, const at::Tensor& w_gate_up,
                                                             const at::Tensor& w_down, const at::Tensor& ids,
                                                             const at::Tensor& weights, bool save,
                                                             c10::string_view activation) {
  using GateUp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                     c10::string_view);
  static const auto gate_up =
      c10::Dispatcher::singleton().findSchemaOrThrow("qwen3moe::grouped_swiglu_gate_up", "").typed<GateUp>();
  static const auto down = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qwen3moe::grouped_swiglu_down", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&)>();
  auto [h, gu] = gate_up.call(x, w_gate_up, ids, save, activation);
  at::Tensor out = down.call(h, w_down, ids, weights);
  return {out, save ? h : x.new_empty({0, h.size(1)}), gu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_cpu(const at::Tensor& x_in, const at::Tensor& w_gate_up_in,
                                                                  const at::Tensor& w_down_in, const at::Tensor& ids_in,
                                                                  const at::Tensor& weights_in, bool save_activations,
                                                                  c10::string_view activation) {
  const Act act = check_args(x_in, w_gate_up_in, w_down_in, ids_in, weights_in, activation);
  const int64_t T = x_in.size(0), H = x_in.size(1), E = w_gate_up_in.size(0), I = w_gate_up_in.size(1) / 2;
  const int64_t k = ids_in.size(1), S = T * k;
  if (T == 0) return {x_in.new_empty({0, H}), x_in.new_empty({0, I}), x_in.new_empty({0, 2 * I})};
  const Path path = selected_path();
  if (path.torch != nullptr) return torch_forward(x_in, w_gate_up_in, w_down_in, ids_in, weights_in, save_activations,
                                                  activation);
  TORCH_CHECK_VALUE(S <= INT32_MAX, kOp, ": T*k = ", S, " does not fit int32 (slot ids are int32)");
  const Kernels& K = kernels_of(path.isa);

  const at::Tensor x = (H <= 1 || x_in.stride(1) == 1) ? x_in : x_in.contiguous();
  const at::Tensor w_gate_up = w_gate_up_in.contiguous(), w_down = w_down_in.contiguous();
  const at::Tensor ids = ids_in.contiguous(), weights = weights_in.contiguous();
  Problem P{};
  P.dtype = x.scalar_type() == at::kFloat ? DType::f32 : (x.scalar_type() == at::kHalf ? DType::f16 : DType::bf16);
  P.act = act;
  P.T = T, P.H = H, P.I = I, P.k = k, P.S = S;
  P.x = x.const_data_ptr();
  P.x_stride = x.stride(0);
  P.w_gate_up = w_gate_up.const_data_ptr();
  P.w_down = w_down.const_data_ptr();
  P.save = save_activations;

  // the routing weights rounded to x's dtype (as transformers does), kept in fp32
  std::vector<float> rw(S);
  const float* wp = weights.const_data_ptr<float>();
  switch (P.dtype) {
    case DType::f32: std::copy(wp, wp + S, rw.begin()); break;
    case DType::f16: round_weights<f16_t>(wp, rw.data(), S); break;
    default: round_weights<bf16_t>(wp, rw.data(), S); break;
  }
  P.rw = rw.data();

  // the slots grouped by expert: moe_sort's stable counting sort (the checks proved the ids in range)
  std::vector<int32_t> count(E + 1), sorted(S);  // count: where each expert's slots start
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "grouped_swiglu_sort", [&] {
    counting_sort(ids.const_data_ptr<index_t>(), S, E, sorted.data(), nullptr, count.data());
  });
  P.sorted = sorted.data();

  // hit experts; the wide ones get their packed h laid out here
  const bool pairs = K.bf16_pairs && P.dtype == DType::bf16;
  std::vector<int32_t> hit_expert;
  std::vector<int64_t> hit_begin, hit_hp, hit_wide_rows;
  int64_t hp_bytes = 0;
  const int64_t wide_rows = K.wide_rows[static_cast<int>(P.dtype)], narrow_rem = K.narrow_rem[static_cast<int>(P.dtype)];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t M = count[e + 1] - count[e];
    if (M == 0) continue;
    hit_expert.push_back(static_cast<int32_t>(e));
    hit_begin.push_back(count[e]);
    // wide rows: 0 (few rows), all of them (padded to a whole vector of lanes), or all but a narrow remainder
    const int64_t rem = M % K.lanes;
    const int64_t mw = M < wide_rows ? 0 : (rem != 0 && rem <= narrow_rem ? M - rem : M);
    hit_wide_rows.push_back(mw);
    hit_hp.push_back(hp_bytes);
    const int64_t m_pad = (mw + K.lanes - 1) / K.lanes * K.lanes;
    hp_bytes += ((pairs ? (I + 1) / 2 : I) * m_pad * 4 + 63) / 64 * 64;
  }
  hit_begin.push_back(S);
  const int64_t n_hit = static_cast<int64_t>(hit_expert.size());
  P.n_hit = n_hit;
  P.hit_expert = hit_expert.data();
  P.hit_begin = hit_begin.data();
  P.hit_wide_rows = hit_wide_rows.data();
  P.hit_hp = hit_hp.data();

  at::Tensor out = at::empty({T, H}, x.options());
  at::Tensor h_rows = at::empty({S, I}, x.options());
  at::Tensor gate_up = save_activations ? at::empty({S, 2 * I}, x.options()) : x.new_empty({0, 2 * I});
  at::Tensor hp = at::empty({hp_bytes + 64}, x.options().dtype(at::kByte));
  P.out = out.data_ptr();
  P.h_rows = h_rows.data_ptr();
  P.gate_up = save_activations ? gate_up.data_ptr() : nullptr;
  P.hp = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(hp.data_ptr()) + 63) / 64 * 64);

  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wbytes = x.element_size();
  // bytes of weights a row-MAC costs as much time as (memory ~20 GB/s, dot products ~100-200 GMAC/s per core)
  const double mac_cost = pairs ? 0.15 : 0.3;

  // gate_up: (hit expert, column block of I), blocks a multiple of col_step; enough blocks for every thread
  const int64_t step = K.col_step;
  const int64_t blocks_per_expert = std::max<int64_t>(1, (4 * nt + n_hit - 1) / n_hit);
  const int64_t cb = std::max<int64_t>(step, ((I + blocks_per_expert - 1) / blocks_per_expert + step - 1) / step * step);
  std::vector<GateUpItem> items;
  std::vector<double> cost;
  for (int64_t h = 0; h < n_hit; ++h) {
    const double M = static_cast<double>(hit_begin[h + 1] - hit_begin[h]);
    for (int64_t c0 = 0; c0 < I; c0 += cb) {
      const int64_t c1 = std::min(I, c0 + cb);
      items.push_back({h, c0, c1});
      cost.push_back(static_cast<double>(c1 - c0) * 2.0 * H * (wbytes + M * mac_cost));
    }
  }
  // down: column blocks of H, each over every hit expert; its [S, hb] fp32 products stay within ~512 KB
  const int64_t by_y = std::max<int64_t>(16, (131072 / std::max<int64_t>(S, 1)) / 16 * 16);
  const int64_t by_threads = std::max<int64_t>(16, ((H + 4 * nt - 1) / (4 * nt) + 15) / 16 * 16);
  const int64_t hb = std::max<int64_t>(1, std::min({H, by_y, by_threads}));
  const int64_t n_down = H == 0 ? 0 : (H + hb - 1) / hb;

  const int64_t scratch_per = (K.scratch_bytes(P, cb, hb) + 63) / 64 * 64;
  at::Tensor scratch = at::empty({scratch_per * nt + 64}, x.options().dtype(at::kByte));
  char* scratch_base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch.data_ptr()) + 63) / 64 * 64);

  const std::vector<int64_t> first = split_by_cost(cost, nt);
  run_threads(nt, [&](int64_t t) {
    for (int64_t i = first[t]; i < first[t + 1]; ++i)
      K.gate_up(P, items[i].hit, items[i].c0, items[i].c1, scratch_base + t * scratch_per);
  });
  run_threads(nt, [&](int64_t t) {
    const int64_t b = n_down * t / nt, e = n_down * (t + 1) / nt;
    for (int64_t blk = b; blk < e; ++blk)
      K.down(P, blk * hb, std::min(H, (blk + 1) * hb), scratch_base + t * scratch_per);
  });
  if (!save_activations) return {out, x.new_empty({0, I}), gate_up};
  return {out, h_rows, gate_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen3moe, CPU, m) {
  m.impl("grouped_swiglu", &grouped_swiglu_cpu);
}
#endif

}  // namespace qwen3moe::experts
