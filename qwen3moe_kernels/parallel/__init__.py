"""Expert parallelism (EP) over ``torch.distributed``: the experts sharded across the ranks of a process group
(NCCL on GPUs, gloo on CPU), each rank with its own tokens.

* ``dispatch(x, ids, weights, group, num_experts) -> (x_local, handle)`` and ``combine(y, handle)``: the slots to
  the ranks owning their experts and back (``all_to_all_single``; differentiable; one host sync per dispatch);
* ``fused_moe(x, router_weight, w_gate_up_shard, w_down_shard, top_k, renormalize, group)``: the sparse MoE block
  (also ``qwen3moe_kernels.ops.fused_moe(..., ep_group=group)``), and ``ExpertParallelMoE``, a module around it;
* ``expert_range(E, group)`` / ``shard_experts(w, group)``: rank r owns experts ``[r*E/world, (r+1)*E/world)``.

Built on the op modules (``moe_sort``, ``moe_permute``, ``moe_unpermute``, ``grouped_swiglu``), beside ``ops``;
imported on first use (``import qwen3moe_kernels`` does not load torch.distributed). ``docs/parallel.md``: the
design, the one host sync, the communication model and the torchrun command.
"""

from .checks import raise_together
from .comm import collective_timer
from .dispatch import EPHandle, combine, dispatch
from .moe import ExpertParallelMoE, expert_range, fused_moe, shard_experts

__all__ = ["dispatch", "combine", "EPHandle", "fused_moe", "ExpertParallelMoE", "expert_range", "shard_experts",
           "collective_timer", "raise_together"]
