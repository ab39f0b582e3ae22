"""Checkpoint loading errors: missing, unexpected, duplicated and misshapen tensors; bad dtype and inputs."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import hf_model, save_per_expert
from safetensors.torch import load_file, save_file

from qwen3moe_kernels.model import Qwen3MoeForCausalLM


@pytest.fixture(scope="module")
def per_expert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("per_expert")
    save_per_expert(hf_model(seed=7), path)
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
