// The experts' CPU kernels for the generic path (grouped_swiglu_cpu_impl.h with one fp32 lane): plain C++ for any
// x86-64 CPU without AVX2/FMA/F16C, compiled with the baseline flags.
#define QWEN3MOE_ISA_GENERIC
#include "grouped_swiglu_cpu_impl.h"
