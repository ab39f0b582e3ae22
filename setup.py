"""Builds qwen3moe_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment switches:
  QWEN3MOE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST         CUDA archs (default "8.0;9.0a;10.0a": A100, H100/H200 with wgmma, B200)
  MAX_JOBS                     parallel compile jobs (ninja)
  NVCC_THREADS                 nvcc --threads per job (default 2)

The extension is built against the torch already installed, so install with
``pip install --no-build-isolation -e .``. Beside ``_C`` the build writes ``_C_build.json`` (the torch it was built
against and how: CUDA archs, or why no CUDA code); importing the package checks it against the running torch.
"""

import glob
import json
import os
import platform
import site
import sys
import sysconfig

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc) would make it
# /usr/local. Prefer the toolkit's own folder when it exists.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

NO_TORCH = ("qwen3moe-kernels builds against the torch already installed, and this Python has none (pip's build "
            "isolation hides it): install torch first, then run `pip install --no-build-isolation -e .`")
try:
    import torch  # noqa: E402
except ImportError:  # pip's isolated build env: fail at once, with what to run, rather than build on another torch
    sys.exit(NO_TORCH)
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a;10.0a"
BUILD_RECORD = "_C_build.json"  # written beside _C; read by qwen3moe_kernels/_ext.py


def _site_dirs():
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # virtualenv's old site module
        pass
    return list(dict.fromkeys(d for d in dirs if d))


def nvidia_include_dirs():
    """Headers pip's nvidia-* wheels install (cu13 keeps them all under nvidia/cu13/include).

    /usr/local/cuda may lack some (cusparse.h) that torch's headers include, so add these first.
    """
    found = []
    for d in _site_dirs():
        found += sorted(glob.glob(os.path.join(d, "nvidia", "cu13", "include")))
        found += sorted(glob.glob(os.path.join(d, "nvidia", "*", "include")))
    return list(dict.fromkeys(found))


def no_cuda_reason():
    """Why the CUDA kernels are not built, or None when they are."""
    if os.environ.get("QWEN3MOE_SKIP_CUDA_BUILD", "0") == "1":
        return "QWEN3MOE_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return f"no nvcc (CUDA_HOME={CUDA_HOME})"
    return None


# The per-ISA kernels of the CPU experts (csrc/grouped_swiglu_cpu_impl.h): each file is compiled with its own -m
# flags and nothing else is, so one build runs on every x86-64 CPU; the op picks the best its CPU has at run time.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"] + _AVX2
ISA_SOURCES = {
    os.path.join("csrc", "grouped_swiglu_cpu_generic.cpp"): [],
    os.path.join("csrc", "grouped_swiglu_cpu_avx2.cpp"): _AVX2,
    os.path.join("csrc", "grouped_swiglu_cpu_avx512.cpp"): _AVX512,
    os.path.join("csrc", "grouped_swiglu_cpu_avx512bf16.cpp"): _AVX512 + ["-mavx512bf16"],
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def extension():
    # the per-ISA files are built by BuildWithRecord.build_extension (x86-64 only; elsewhere the CPU experts run the
    # torch implementation)
    cpp = sorted(f for f in glob.glob(os.path.join("csrc", "*.cpp")) if f not in ISA_SOURCES)
    # setuptools relinks only when a source or dependency is newer than the library: the per-ISA files and the
    # headers count too
    depends = sorted(list(ISA_SOURCES) + glob.glob(os.path.join("csrc", "*.h")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    if no_cuda_reason() is not None:
        print(f"qwen3moe_kernels: building the CPU kernels only ({no_cuda_reason()})")
        return CppExtension("qwen3moe_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")], depends=depends)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                  f"--threads={os.environ.get('NVCC_THREADS', '2')}", "-DQWEN3MOE_WITH_CUDA"]
    print(f"qwen3moe_kernels: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension(
        "qwen3moe_kernels._C",
        cpp + cu,
        include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DQWEN3MOE_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        depends=depends,
    )


class BuildWithRecord(BuildExtension):
    """torch's BuildExtension, plus the per-ISA objects (each file with its own flags, linked into ``_C``), then
    ``_C_build.json`` beside the built library (in a wheel too)."""

    def build_extension(self, ext):
        if IS_X86_64:
            base = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            objects = []
            for src, flags in ISA_SOURCES.items():
                # one output folder (and ninja file) per ISA: each keeps its own incremental build
                out_dir = os.path.join(self.build_temp, "isa_" + os.path.splitext(os.path.basename(src))[0])
                objects += self.compiler.compile([src], output_dir=out_dir, macros=ext.define_macros,
                                                 include_dirs=ext.include_dirs, debug=self.debug,
                                                 extra_postargs={"cxx": list(base) + flags, "nvcc": []},
                                                 depends=ext.depends)
            ext.extra_objects = [o for o in (ext.extra_objects or []) if o not in objects] + objects
        super().build_extension(ext)

    def run(self):
        super().run()
        reason = no_cuda_reason()
        record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_archs": None if reason else os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS),
                  "no_cuda_reason": reason}
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")


setup(
    packages=find_packages(include=["qwen3moe_kernels", "qwen3moe_kernels.*"]),
    package_data={"qwen3moe_kernels": ["kernels/configs/*.json", BUILD_RECORD]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithRecord.with_options(use_ninja=True)},
)
