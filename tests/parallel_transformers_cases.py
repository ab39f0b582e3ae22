"""transformers' own expert parallelism, end to end, run on every rank of a spawned gloo group
(``tests/test_parallel_transformers.py``): ``from_pretrained(..., distributed_config=DistributedConfig(...))``
shards the experts itself; its logits must match the unsharded model's, with transformers' experts and with ours
registered (slots owned by the other rank reach them as sentinel ids), and the thin model's under our EP."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# all_to_all: each rank its own batch (attention data-parallel); all_reduce: the EP group shares one batch
MODES = ("all_to_all", "all_reduce")


def run(rank: int, world: int, ckpt: str) -> dict:
    # transformers reads the launch from torchrun's variables
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from qwen3moe_kernels import implementations, recorder
    from qwen3moe_kernels.integrations import transformers as qk_hf
    from qwen3moe_kernels.model import Qwen3MoeForCausalLM

    configs = {"all_to_all": DistributedConfig(ep_size=world, fsdp_size=world, tp_plan={}),
               "all_reduce": DistributedConfig(tp_size=world, ep_size=world, tp_plan={})}
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    ours = Qwen3MoeForCausalLM.from_pretrained(ckpt, ep_group=dist.group.WORLD)
    out = {}
    for experts in ("eager", qk_hf.register()):
        for mode in MODES:
            shared = mode == "all_reduce"
            recorder.reset()
            model = AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=configs[mode], dtype=torch.float32,
                                                         attn_implementation="eager", experts_implementation=experts)
            w = model.model.layers[0].mlp.experts.gate_up_proj
            local = w.to_local() if hasattr(w, "to_local") else w
            g = torch.Generator().manual_seed(0 if shared else 1 + rank)
            ids = torch.randint(0, ref.config.vocab_size, (2 if shared else 1 + rank, 6), generator=g)
            with torch.no_grad():
                got, want = model(ids).logits, ref(ids).logits
                mine = ours(ids).logits if not shared else None
            out[f"{mode} {experts}"] = {
                "local_experts": local.shape[0], "max_diff": (got - want).abs().max().item(),
                "max_diff_ours": None if mine is None else (mine - want).abs().max().item(),
                "moe_experts": implementations().get("moe_experts")}
            del model
    return out
