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
Missing, unexpected, duplicated, misshapen or non-floating-point tensors raise ``ValueError`` naming the
tensor; so does a shard index whose ``weight_map`` disagrees with what the shards hold. ``dtype`` and
``device`` are checked before any file is read.

Expert parallelism (``ep_group``): rank r's model holds experts ``[r*E/world, (r+1)*E/world)`` only. Their
per-expert tensors are read, the other experts' are never read (only their names, in the file header); a fused
``[E, ...]`` tensor is read as its ``[first:end]`` slice (safetensors reads just those bytes).
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
# map_name's answer for a per-expert tensor of an expert another rank holds (expert parallelism): not read
ELSEWHERE = ("", None, "elsewhere")


def map_name(name: str, params: dict[str, torch.Tensor], experts: tuple[int, int] | None = None):
    """Checkpoint name -> ``(param name, index into it or None, piece key)``; None when it is not ours.

    ``experts=(first, end)``: the model holds only those experts (expert parallelism), at local index
    ``j - first``; a per-expert tensor of another expert in ``[0, E)`` maps to :data:`ELSEWHERE`."""
    m = _PER_EXPERT.match(name)
    if m:
        prefix, j, kind = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.w_down" if kind == "down_proj" else f"{prefix}.w_gate_up"
        if target not in params:
            return None
        if experts is not None:
            first, end = experts
            router = params.get(f"{prefix}.router_weight")
            if not first <= j < end and j < (end if router is None else router.shape[0]):
                return ELSEWHERE
            j -= first
        E = params[target].shape[0]
        if not 0 <= j < E:
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


def _missing_names(pname: str, param: torch.Tensor, done: set, experts: tuple[int, int, int] | None = None
                   ) -> list[str]:
    """Checkpoint names (with expected shapes) still needed for ``pname``, in the layout already begun;
    ``experts=(first, end, E)`` under expert parallelism."""
    stem = pname.rsplit(".", 1)[0]
    is_experts = pname.endswith((".w_gate_up", ".w_down"))
    first = experts[0] if experts is not None and is_experts else 0
    if is_experts and done:
        kinds = ("down_proj",) if pname.endswith(".w_down") else ("gate_proj", "up_proj")
        rows = param.shape[1] // len(kinds)
        return [f"{stem}.experts.{first + j}.{k}.weight {(rows, param.shape[2])}"
                for j in range(param.shape[0]) for k in kinds if (j, k) not in done]
    fused = {"router_weight": "gate.weight", "w_gate_up": "experts.gate_up_proj", "w_down": "experts.down_proj"}
    leaf = pname.rsplit(".", 1)[1]
    name = f"{stem}.{fused[leaf]}" if leaf in fused and stem.endswith(".mlp") else pname
    shape = tuple(param.shape)
    if experts is not None and is_experts:
        shape = (experts[2],) + shape[1:]
    return [f"{name} {shape}"]


def _read_weight_map(index: str) -> dict[str, str]:
    with open(index) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a JSON object whose 'weight_map' maps tensor names to shard file names")
    return weight_map


def _check_shard(index: str, weight_map: dict[str, str], fname: str, names: set[str]) -> None:
    """The tensors in shard ``fname`` must be exactly those the index maps to it."""
    listed = {n for n, shard in weight_map.items() if shard == fname}
    absent = sorted(listed - names)
    if absent:
        raise ValueError(f"{index} maps tensor {absent[0]!r} to {fname!r}, which does not hold it"
                         + (f" (+{len(absent) - 1} more)" if len(absent) > 1 else ""))
    for name in sorted(names - listed):
        where = f"maps it to {weight_map[name]!r}" if name in weight_map else "does not list it"
        raise ValueError(f"shard {fname!r} holds tensor {name!r}, but {index} {where}")


def _shards(path: str) -> list[str]:
    """The safetensors files of the checkpoint; a shard index is checked against the shards' headers first."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = _read_weight_map(index)
        files = sorted(set(weight_map.values()))
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise ValueError(f"{index} lists shard {fname!r}, which does not exist")
            with safe_open(full, framework="pt", device="cpu") as f:  # reads the header only
                _check_shard(index, weight_map, fname, set(f.keys()))
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _check_device(device) -> torch.device:
    """``device`` as a torch.device that can hold the weights, checked before any checkpoint file is read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from e
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data, so the checkpoint cannot be loaded onto it; "
                         "pass a real device such as 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs CUDA, but torch.cuda.is_available() is False here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    try:
        torch.empty(0, device=dev)  # any other backend (mps, xpu, ...) that is not usable fails here
    except (RuntimeError, AssertionError) as e:  # first line: some backends append their whole dispatch table
        raise ValueError(f"device={device!r} cannot hold tensors here: {str(e).splitlines()[0]}") from e
    return dev


def load_pretrained(cls, path, dtype=torch.float32, device="cpu", backend=None, ep_group=None):
    path = os.fspath(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = _check_device(device)
    config = Qwen3MoeConfig.from_pretrained(path)
    experts = None
    if ep_group is not None:
        from ..parallel import expert_range

        experts = expert_range(config.num_experts, ep_group)  # ValueError unless E % world == 0
    files = _shards(path)
    with torch.device("meta"):
        model = cls(config, backend=backend, ep_group=ep_group)
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
                target = map_name(name, params, experts)
                if target is None:
                    raise ValueError(f"unexpected tensor {name!r} in {os.path.basename(fname)}")
                if target is ELSEWHERE:
                    continue  # another rank's expert: not read
                pname, index, piece = target
                dest = params[pname] if index is None else params[pname][index]
                shape = tuple(f.get_slice(name).get_shape())
                rows = None  # under expert parallelism a fused [E, ...] tensor is read as this rank's rows
                want = tuple(dest.shape)
                if experts is not None and index is None and pname.endswith((".w_gate_up", ".w_down")):
                    rows, want = slice(*experts), (config.num_experts,) + want[1:]
                if shape != want:
                    raise ValueError(f"tensor {name!r} has shape {shape}, expected {want}")
                if piece in done[pname]:
                    raise ValueError(f"tensor {name!r} is given twice")
                if done[pname] and (piece == "all") != ("all" in done[pname]):
                    raise ValueError(f"tensor {name!r}: {pname} given both fused and per expert")
                tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
                if not tensor.dtype.is_floating_point:
                    # copy_ would convert it silently: integer weights mean a quantized or broken checkpoint
                    raise ValueError(f"tensor {name!r} in {os.path.basename(fname)} has dtype {tensor.dtype}, "
                                     f"expected a floating-point dtype")
                with torch.no_grad():
                    dest.copy_(tensor)
                done[pname].add(piece)
    missing = []
    for pname, param in params.items():
        if "all" not in done[pname] and len(done[pname]) != _pieces_needed(pname, param):
            missing.extend(_missing_names(pname, param, done[pname],
                                          None if experts is None else (*experts, config.num_experts)))
    if missing:
        raise ValueError(f"missing tensors in checkpoint {path}: {missing[:10]}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    return model.eval()
