"""Developer tools, each run as ``python -m qwen3moe_kernels.tools.<name>``; ``import qwen3moe_kernels`` never
imports them.

``compile_check`` (the ahead-of-time compile check behind ``qwen3moe-kernels compile-check``),
``tune_grouped_swiglu`` (the grouped-GEMM SwiGLU tile tuner, on a GPU) and ``gpu_run`` (the one-command GPU run).
See README.md beside this file and docs/gpu_verification.md.
"""
