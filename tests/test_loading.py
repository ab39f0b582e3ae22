"""Checkpoint loading errors: missing, unexpected, duplicated, misshapen and integer tensors (per-expert and fused
layouts); inconsistent shard indexes; bad dtype, device and inputs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from model_fixtures import hf_model, save_fused, save_per_expert
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen3moe_kernels.model import Qwen3MoeForCausalLM


@pytest.fixture(scope="module")
def per_expert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("per_expert")
    save_per_expert(hf_model(seed=7), path)
    return path


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused")
    save_fused(hf_model(seed=7), path)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    hf_model(seed=7).save_pretrained(path, max_shard_size="40KB")
    return path


def _rewrite(src, dst, edit):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_loads_without_extra_copies_and_on_requested_dtype(per_expert_dir):
    m = Qwen3MoeForCausalLM.from_pretrained(per_expert_dir, dtype=torch.float16)
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in m.parameters())
    sd = load_file(str(per_expert_dir / "model.safetensors"))
    w = m.model.layers[1].mlp.w_gate_up
    torch.testing.assert_close(w[3, :24], sd["model.layers.1.mlp.experts.3.gate_proj.weight"].half(), atol=0, rtol=0)
    torch.testing.assert_close(w[3, 24:], sd["model.layers.1.mlp.experts.3.up_proj.weight"].half(), atol=0, rtol=0)


def test_missing_tensor(per_expert_dir, tmp_path):
    d = _rewrite(per_expert_dir, tmp_path / "m", lambda sd: sd.pop("model.layers.0.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight \(24, 64\)"):
        Qwen3MoeForCausalLM.from_pretrained(d)
    d = _rewrite(per_expert_dir, tmp_path / "n", lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.norm\.weight \(64,\)"):
        Qwen3MoeForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.6.up_proj.weight", "model.layers.0.extra.weight",
                                  "model.layers.9.input_layernorm.weight"])
def test_unexpected_tensor(per_expert_dir, tmp_path, name):
    d = _rewrite(per_expert_dir, tmp_path / "u", lambda sd: sd.__setitem__(name, torch.ones(24, 64)))
    with pytest.raises(ValueError, match="unexpected tensor '" + name.replace(".", r"\.")):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_misshapen_tensor(per_expert_dir, tmp_path):
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    d = _rewrite(per_expert_dir, tmp_path / "s", lambda sd: sd.__setitem__(name, torch.ones(64, 23)))
    with pytest.raises(ValueError, match=r"down_proj\.weight.*\(64, 23\), expected \(64, 24\)"):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_fused_and_per_expert_mixed(per_expert_dir, tmp_path):
    d = _rewrite(per_expert_dir, tmp_path / "x",
                 lambda sd: sd.__setitem__("model.layers.0.mlp.experts.down_proj", torch.ones(6, 64, 24)))
    with pytest.raises(ValueError, match="experts.down_proj"):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_missing_files(per_expert_dir, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((per_expert_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors"):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors"):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path)


def test_bad_dtype_and_inputs(per_expert_dir):
    with pytest.raises(TypeError, match="dtype"):
        Qwen3MoeForCausalLM.from_pretrained(per_expert_dir, dtype=torch.int8)
    m = Qwen3MoeForCausalLM.from_pretrained(per_expert_dir)
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        m(torch.full((1, 3), 96))
    with pytest.raises(ValueError, match="meta"):
        m(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_fused_layout_loads_as_is(fused_dir):
    sd = load_file(str(fused_dir / "model.safetensors"))
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (6, 48, 64)
    m = Qwen3MoeForCausalLM.from_pretrained(fused_dir)
    mlp = m.model.layers[1].mlp
    for ours, name in ((mlp.w_gate_up, "experts.gate_up_proj"), (mlp.w_down, "experts.down_proj"),
                       (mlp.router_weight, "gate.weight")):
        torch.testing.assert_close(ours, sd[f"model.layers.1.mlp.{name}"], atol=0, rtol=0)


@pytest.mark.parametrize("name, shape", [("model.layers.0.mlp.experts.gate_up_proj", (6, 48, 64)),
                                         ("model.layers.1.mlp.experts.down_proj", (6, 64, 24)),
                                         ("model.layers.0.mlp.gate.weight", (6, 64))])
def test_fused_layout_missing_tensor(fused_dir, tmp_path, name, shape):
    d = _rewrite(fused_dir, tmp_path / "m", lambda sd: sd.pop(name))
    with pytest.raises(ValueError, match=r"missing.*" + re.escape(f"{name} {shape}")):
        Qwen3MoeForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("name, bad, expected", [
    ("model.layers.0.mlp.experts.gate_up_proj", (6, 24, 64), r"\(6, 24, 64\), expected \(6, 48, 64\)"),
    ("model.layers.1.mlp.experts.down_proj", (6, 24, 64), r"\(6, 24, 64\), expected \(6, 64, 24\)"),
    ("model.layers.1.mlp.experts.down_proj", (5, 64, 24), r"\(5, 64, 24\), expected \(6, 64, 24\)"),
])
def test_fused_layout_misshapen_tensor(fused_dir, tmp_path, name, bad, expected):
    d = _rewrite(fused_dir, tmp_path / "s", lambda sd: sd.__setitem__(name, torch.ones(bad)))
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + expected):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_integer_tensor_is_an_error(per_expert_dir, tmp_path):
    d = _rewrite(per_expert_dir, tmp_path / "i",
                 lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' .*dtype torch\.int32, expected a floating-point"):
        Qwen3MoeForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("device, match", [
    ("meta", "device='meta' holds no data"),
    ("cuda:99", "device='cuda:99'"),
    ("gpu", "device must be a torch.device or a device string.*'gpu'"),
    (None, "device must be a torch.device or a device string.*None"),
])
def test_bad_device_is_refused_before_reading(tmp_path, device, match):
    # tmp_path holds no checkpoint at all: the device error must come first, not a missing config.json
    with pytest.raises(ValueError, match=match):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path):
    with pytest.raises(ValueError, match=r"device='cuda' needs CUDA, but torch\.cuda\.is_available\(\) is False"):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path, device="cuda")


def _edit_index(src, dst, edit):
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return dst


def _shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_sharded_loads(sharded_dir):
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    Qwen3MoeForCausalLM.from_pretrained(sharded_dir)


def test_index_lists_absent_tensor(sharded_dir, tmp_path):
    shard = _shard_of(sharded_dir, "model.norm.weight")
    d = _edit_index(sharded_dir, tmp_path / "a", lambda wm: wm.__setitem__("model.extra.weight", shard))
    want = f"maps tensor 'model.extra.weight' to '{shard}', which does not hold it"
    with pytest.raises(ValueError, match=re.escape(want)):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_index_omits_present_tensor(sharded_dir, tmp_path):
    d = _edit_index(sharded_dir, tmp_path / "o", lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"holds tensor 'model\.norm\.weight', but .*index\.json does not list it"):
        Qwen3MoeForCausalLM.from_pretrained(d)


def test_index_maps_tensor_elsewhere(sharded_dir, tmp_path):
    name = "model.norm.weight"
    actual = _shard_of(sharded_dir, name)
    other = next(p.name for p in sorted(sharded_dir.glob("*.safetensors")) if p.name != actual)
    with safe_open(str(sharded_dir / other), framework="pt") as f:
        assert name not in f.keys()
    d = _edit_index(sharded_dir, tmp_path / "e", lambda wm: wm.__setitem__(name, other))
    # whichever shard is checked first, the error names the tensor and where the index puts it
    first = re.escape(f"maps tensor '{name}' to '{other}', which does not hold it")
    second = re.escape(f"shard '{actual}' holds tensor '{name}', but ") + ".* " + re.escape(f"maps it to '{other}'")
    with pytest.raises(ValueError, match=f"{first}|{second}"):
        Qwen3MoeForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), (json.dumps([1]), "weight_map"),
                                         (json.dumps({"weight_map": {"a": 3}}), "weight_map"),
                                         (json.dumps({"metadata": {}}), "weight_map")])
def test_malformed_index(per_expert_dir, tmp_path, text, match):
    (tmp_path / "config.json").write_text((per_expert_dir / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors.index.json")) + ": .*" + match):
        Qwen3MoeForCausalLM.from_pretrained(tmp_path)
