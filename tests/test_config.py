"""Qwen3MoeConfig: both spellings of real config.json files, and clear errors for bad ones."""

from __future__ import annotations

import json

import pytest
from model_fixtures import BASE, hf_model, read_config

from qwen3moe_kernels.model import Qwen3MoeConfig


def test_reads_transformers_saved_config(tmp_path):
    hf = hf_model(**{**BASE, "num_experts": 10, "mlp_only_layers": [1], "tie_word_embeddings": True})
    hf.config.save_pretrained(tmp_path)
    raw = read_config(tmp_path)
    cfg = Qwen3MoeConfig.from_pretrained(tmp_path)
    assert cfg.num_experts == 10 and cfg.mlp_only_layers == [1] and cfg.tie_word_embeddings
    assert cfg.head_dim == 24 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.rope_theta == float(raw.get("rope_theta", raw.get("rope_parameters", {}).get("rope_theta")))
    assert [cfg.is_sparse(i) for i in range(2)] == [True, False]


def test_released_spellings():
    d = {**BASE, "num_local_experts": 8, "rope_theta": 5e5, "hidden_act": "silu", "architectures": ["X"],
         "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": None}
    d.pop("num_experts")
    cfg = Qwen3MoeConfig.from_dict(d)
    assert cfg.num_experts == 8 and cfg.rope_theta == 5e5
    d2 = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert Qwen3MoeConfig.from_dict(d2).rope_theta == 1e4


def test_head_dim_default():
    d = {**BASE}
    d.pop("head_dim")
    assert Qwen3MoeConfig.from_dict(d).head_dim == 16


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
        ({"num_local_experts": 8}, "disagree"),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "disagree"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "linear"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"use_sliding_window": True}, "sliding"),
        ({"moe_layer_freq": 2}, "unknown .*moe_layer_freq"),
        ({"model_type": "llama"}, "model_type"),
        ({"mlp_only_layers": [5]}, "mlp_only_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"head_dim": 7}, "even"),
    ],
)
def test_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        Qwen3MoeConfig.from_dict({**BASE, **change})


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="object"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
