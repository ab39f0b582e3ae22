"""Tiny random transformers Qwen3-MoE models saved to disk, for the parity and loading tests."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
    num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    router_aux_loss_coef=0.02, tie_word_embeddings=False,
)


def hf_model(seed: int = 0, **overrides):
    """A random fp32 transformers Qwen3MoeForCausalLM (eager attention), weights non-trivial everywhere."""
    from transformers import Qwen3MoeConfig as HFConfig
    from transformers import Qwen3MoeForCausalLM as HFModel

    kw = {**BASE, **overrides}
    torch.manual_seed(seed)
    cfg = HFConfig(**kw, attn_implementation="eager")
    model = HFModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # ones would hide a missing norm weight
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_per_expert(hf, path) -> None:
    """Write ``hf`` in the released per-expert layout (mlp.experts.{j}.{gate,up,down}_proj.weight)."""
    os.makedirs(path, exist_ok=True)
    hf.config.save_pretrained(path)
    sd = {}
    for name, t in hf.state_dict().items():
        if hf.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                sd[f"{prefix}{j}.gate_proj.weight"] = t[j, :inter].clone()
                sd[f"{prefix}{j}.up_proj.weight"] = t[j, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                sd[f"{prefix}{j}.down_proj.weight"] = t[j].clone()
        else:
            sd[name] = t.contiguous().clone()
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def save_fused(hf, path) -> None:
    """Write ``hf.state_dict()`` as it is, in transformers' fused 3-D expert layout
    (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``).

    ``save_pretrained`` cannot make this file: transformers 5.24 converts the experts back to the per-expert
    layout when it saves. A tied model's file keeps its ``lm_head.weight`` copy, as some tied checkpoints do.
    """
    os.makedirs(path, exist_ok=True)
    hf.config.save_pretrained(path)
    sd = {name: t.detach().contiguous().clone() for name, t in hf.state_dict().items()}  # clone: no shared storage
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def read_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
