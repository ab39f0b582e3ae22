"""qwen3moe-kernels: CUDA and Triton kernels, behind PyTorch ops, for Qwen3-MoE models.

``qwen3moe_kernels.reference`` is the specification (pure PyTorch); ``qwen3moe_kernels.ops`` holds the
registered ``torch.ops.qwen3moe`` ops; ``qwen3moe_kernels.implementations()`` says which implementation
each op used last.
"""

from . import _ext, reference  # _ext loads _C (registering its ops) and checks it was built for this torch
from .dispatch import FallbackWarning, implementations

__version__ = "0.1.0"
__all__ = ["reference", "implementations", "FallbackWarning", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "__version__"]


def __getattr__(name: str):
    # The model is imported on first use, so `import qwen3moe_kernels` stays light.
    if name in ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'qwen3moe_kernels' has no attribute {name!r}")
