"""qwen3moe-kernels: CUDA and Triton kernels, behind PyTorch ops, for Qwen3-MoE models.

``import qwen3moe_kernels`` registers every ``torch.ops.qwen3moe.*`` op (triton is imported only on a kernel's
first CUDA call). Users call ``qwen3moe_kernels.ops`` (``fused_moe``, ``moe_experts``, ``router_topk``, ...);
``reference`` is the specification they are tested against; ``implementations()`` says which implementation each
op ran last; the thin model is ``Qwen3MoeForCausalLM`` and the transformers drop-in ``integrations.transformers``.
``docs/architecture.md`` maps the layers.
"""

from . import _ext, ops, reference  # _ext loads _C (its ops) and checks it was built for the running torch
from .recorder import FallbackWarning, implementations

__version__ = "0.1.0"
__all__ = ["ops", "reference", "implementations", "FallbackWarning", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
           "__version__"]


def __getattr__(name: str):
    # The model is imported on first use, so `import qwen3moe_kernels` stays light.
    if name in ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'qwen3moe_kernels' has no attribute {name!r}")
