"""Builds qwen3moe_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment switches:
  QWEN3MOE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST         CUDA archs (default "8.0;9.0a;10.0a": A100, H100/H200 with wgmma, B200)
  MAX_JOBS                     parallel compile jobs (ninja)
  NVCC_THREADS                 nvcc --threads per job (default 2)

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
"""

import glob
import os
import site
import sysconfig

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc) would make it
# /usr/local. Prefer the toolkit's own folder when it exists.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def want_cuda():
    if os.environ.get("QWEN3MOE_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    )


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    if not want_cuda():
        print("qwen3moe_kernels: building the CPU kernels only")
        return CppExtension("qwen3moe_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;10.0a")
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
    )


setup(
    packages=find_packages(include=["qwen3moe_kernels", "qwen3moe_kernels.*"]),
    package_data={"qwen3moe_kernels": ["kernels/configs/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
