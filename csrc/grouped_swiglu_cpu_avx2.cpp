// The experts' CPU kernels for the avx2 path (grouped_swiglu_cpu_impl.h), compiled with that ISA's -m flags
// (setup.py): only this file. The op chooses it at run time, never on a CPU without these instructions.
#define QWEN3MOE_ISA_AVX2
#include "grouped_swiglu_cpu_impl.h"
