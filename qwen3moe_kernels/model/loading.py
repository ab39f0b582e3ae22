"""Checkpoint loading: a Hugging Face Qwen3-MoE directory into ``Qwen3MoeForCausalLM``, tensor by tensor.

The model is built on the meta device (no memory), given empty storage of the target dtype on the target
device, and each checkpoint tensor is read from safetensors and copied into its place (converted on the way),
so the weights are never held twice. Accepted layouts:

* ``model.safetensors`` or shards listed by ``model.safetensors.index.json``;
* experts per expert, as the released Qwen checkpoints store them
  (``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``), or in transformers' fused 3-D layout
  (``model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, H]``, ``...experts.down_proj [E, H, I]``).

The name-mapping rule (checkpoint name -> our parameter, and which slice of it):
``mlp.gate.weight -> mlp.router_weight``; ``experts.gate_up_proj -> w_gate_up``; ``experts.down_proj ->
w_down``; ``experts.{j}.gate_proj.weight -> w_gate_up[j, :I]``; ``experts.{j}.up_proj.weight ->
w_gate_up[j, I:]``; ``experts.{j}.down_proj.weight -> w_down[j]``; every other name is ours as is.
Missing, unexpected, duplicated or misshapen tensors raise ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open

from .config import Qwen3MoeConfig

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp)\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")
_FUSED_NAMES = {"gate.weight": "router_weight", "experts.gate_up_proj": "w_gate_up", "experts.down_proj": "w_down"}


def map_name(name: str, params: dict[str, torch.Tensor]):
    """Checkpoint name -> ``(param name, index into it or None, piece key)``; None when it is not ours."""
    m = _PER_EXPERT.match(name)
    if m:
        prefix, j, kind = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.w_down" if kind == "down_proj" else f"{prefix}.w_gate_up"
        if target not in params:
            return None
        E = params[target].shape[0]
        if j >= E:
            return None
        if kind == "down_proj":
            return target, (j,), (j, kind)
        inter = params[target].shape[1] // 2
        rows = slice(0, inter) if kind == "gate_proj" else slice(inter, 2 * inter)
        return target, (j, rows), (j, kind)
    m = _FUSED.match(name)
    if m:
        target = f"{m.group(1)}.{_FUSED_NAMES[m.group(2)]}"
        return (target, None, "all") if target in params else None
    return (name, None, "all") if name in params else None


def _pieces_needed(pname: str, param: torch.Tensor) -> int:
    if pname.endswith(".w_gate_up"):
        return 2 * param.shape[0]
    if pname.endswith(".w_down"):
        return param.shape[0]
    return 1


def _missing_names(pname: str, param: torch.Tensor, done: set) -> list[str]:
    """Checkpoint names (with expected shapes) still needed for ``pname``, in the layout already begun."""
    stem = pname.rsplit(".", 1)[0]
    if pname.endswith((".w_gate_up", ".w_down")) and done:
        kinds = ("down_proj",) if pname.endswith(".w_down") else ("gate_proj", "up_proj")
        rows = param.shape[1] // len(kinds)
        return [f"{stem}.experts.{j}.{k}.weight {(rows, param.shape[2])}"
                for j in range(param.shape[0]) for k in kinds if (j, k) not in done]
    fused = {"router_weight": "gate.weight", "w_gate_up": "experts.gate_up_proj", "w_down": "experts.down_proj"}
    leaf = pname.rsplit(".", 1)[1]
    name = f"{stem}.{fused[leaf]}" if leaf in fused and stem.endswith(".mlp") else pname
    return [f"{name} {tuple(param.shape)}"]


def _shards(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not os.path.exists(os.path.join(path, fname)):
                raise ValueError(f"{index} lists shard {fname!r}, which does not exist")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_pretrained(cls, path, dtype=torch.float32, device="cpu", backend="eager"):
    path = os.fspath(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    config = Qwen3MoeConfig.from_pretrained(path)
    files = _shards(path)
    with torch.device("meta"):
        model = cls(config, backend=backend)
    model = model.to(dtype).to_empty(device=device)  # on meta, .to(dtype) allocates nothing
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())  # tied weights appear once (under the embedding's name)
    done: dict[str, set] = {n: set() for n in params}
    for fname in files:
        with safe_open(fname, framework="pt", device="cpu") as f:
            for name in f.keys():
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints carry a copy; the embedding is the weight
                target = map_name(name, params)
                if target is None:
                    raise ValueError(f"unexpected tensor {name!r} in {os.path.basename(fname)}")
                pname, index, piece = target
                dest = params[pname] if index is None else params[pname][index]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(dest.shape):
                    raise ValueError(f"tensor {name!r} has shape {shape}, expected {tuple(dest.shape)}")
                if piece in done[pname]:
                    raise ValueError(f"tensor {name!r} is given twice")
                if done[pname] and (piece == "all") != ("all" in done[pname]):
                    raise ValueError(f"tensor {name!r}: {pname} given both fused and per expert")
                with torch.no_grad():
                    dest.copy_(f.get_tensor(name))
                done[pname].add(piece)
    missing = []
    for pname, param in params.items():
        if "all" not in done[pname] and len(done[pname]) != _pieces_needed(pname, param):
            missing.extend(_missing_names(pname, param, done[pname]))
    if missing:
        raise ValueError(f"missing tensors in checkpoint {path}: {missing[:10]}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    return model.eval()
