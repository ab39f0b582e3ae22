// Every qwen3moe op schema, defined once. Kernels register per device in <stem>_cpu.cpp / <stem>.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing qwen3moe_kernels._C runs the static TORCH_LIBRARY registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(qwen3moe, m) {
}
