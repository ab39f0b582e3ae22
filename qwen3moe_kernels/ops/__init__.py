"""The public ops: one function per op, each checking its arguments and choosing the implementation that runs.

Importing registers every ``torch.ops.qwen3moe.*`` op's fake (and the Triton CUDA kernels, imported on first use).
Each ``ops/<stem>.py`` holds one op's checks, fake, autograd and registration; ``docs/architecture.md`` maps the
layers. The functions take and return what the ``qwen3moe_kernels.reference`` function of the same name does.
"""

from .fused_moe import fused_moe
from .grouped_swiglu import moe_experts
from .moe_permute import moe_align_block, moe_permute, moe_sort, moe_unpermute
from .rms_norm import fused_add_rms_norm, rms_norm, rms_norm_backward
from .rope import qk_norm_rope, qk_norm_rope_backward, qk_norm_rope_positions, rope, rope_inv_freq, rope_positions
from .router_topk import router_topk

__all__ = ["fused_moe", "moe_experts", "router_topk", "moe_sort", "moe_align_block", "moe_permute", "moe_unpermute",
           "rms_norm", "fused_add_rms_norm", "rms_norm_backward", "rope", "rope_positions", "qk_norm_rope",
           "qk_norm_rope_positions", "qk_norm_rope_backward", "rope_inv_freq"]
