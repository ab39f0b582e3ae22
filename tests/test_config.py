"""Qwen3MoeConfig: transformers' defaults, both spellings of real config.json files, and clear errors for bad ones."""

from __future__ import annotations

import dataclasses
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


def _as_transformers_reads(hf) -> dict:
    """Our fields' values from a transformers Qwen3MoeConfig, as its modeling code reads them."""
    values = {f.name: getattr(hf, f.name, None) for f in dataclasses.fields(Qwen3MoeConfig)}
    values["rope_theta"] = hf.rope_parameters["rope_theta"]
    values["head_dim"] = getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    return values


def test_defaults_are_transformers_defaults():
    from transformers import Qwen3MoeConfig as HFConfig

    assert dataclasses.asdict(Qwen3MoeConfig()) == _as_transformers_reads(HFConfig())


def test_trimmed_config_reads_as_transformers_reads_it(tmp_path):
    # A config.json that leaves out norm_topk_prob, rope_theta, num_hidden_layers, ...: every missing key must
    # take transformers' default, or the same checkpoint gives other logits here than in transformers.
    from transformers import Qwen3MoeConfig as HFConfig

    trimmed = {"model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(trimmed))
    ours = Qwen3MoeConfig.from_pretrained(tmp_path)
    assert dataclasses.asdict(ours) == _as_transformers_reads(HFConfig.from_pretrained(tmp_path))
    assert ours.norm_topk_prob is False and ours.rope_theta == 10000.0 and ours.num_hidden_layers == 24


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
        ({"hidden_act": "mish"}, "hidden_act must be one of"),
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


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"tie_word_embeddings": "false"}, TypeError, "tie_word_embeddings must be a bool"),
        ({"norm_topk_prob": "no"}, TypeError, "norm_topk_prob must be a bool"),
        ({"attention_bias": 0}, TypeError, "attention_bias must be a bool"),
        ({"mlp_only_layers": 3}, TypeError, "mlp_only_layers must be a list of layer indices"),
        ({"mlp_only_layers": [True]}, TypeError, "mlp_only_layers must be a list of layer indices"),
        ({"mlp_only_layers": [1.0]}, TypeError, "mlp_only_layers must be a list of layer indices"),
        ({"mlp_only_layers": [1, 1]}, ValueError, r"mlp_only_layers must not repeat a layer, got \[1\]"),
        ({"mlp_only_layers": [-1]}, ValueError, "mlp_only_layers entries"),
        ({"rms_norm_eps": "x"}, TypeError, "rms_norm_eps must be a positive number, got 'x'"),
        ({"rms_norm_eps": 0}, ValueError, "rms_norm_eps must be a positive number"),
        ({"rope_theta": "1e6"}, TypeError, "rope_theta must be a positive number"),
        ({"rope_theta": float("nan")}, ValueError, "rope_theta must be a positive number"),
        ({"router_aux_loss_coef": None}, TypeError, "router_aux_loss_coef must be a finite number"),
        ({"num_hidden_layers": True}, TypeError, "num_hidden_layers must be a positive int, got True"),
        ({"hidden_size": 64.0}, TypeError, "hidden_size must be a positive int"),
        ({"head_dim": "24"}, TypeError, "head_dim must be a positive int"),
        ({"num_experts": -1}, ValueError, "num_experts must be a non-negative int"),
        ({"moe_intermediate_size": 0}, ValueError, "moe_intermediate_size must be positive"),
        ({"mlp_only_layers": [0], "intermediate_size": 0}, ValueError, "intermediate_size must be positive"),
        ({"use_sliding_window": "false"}, ValueError, "use_sliding_window must be false"),
    ],
)
def test_bad_types_and_sizes(change, error, match):
    with pytest.raises(error, match=match):
        Qwen3MoeConfig.from_dict({**BASE, **change})


def test_zero_sizes_allowed_where_unused():
    # moe_intermediate_size only matters for sparse layers, intermediate_size only for dense ones.
    assert not Qwen3MoeConfig.from_dict({**BASE, "num_experts": 0, "moe_intermediate_size": 0}).is_sparse(0)
    assert Qwen3MoeConfig.from_dict({**BASE, "intermediate_size": 0}).is_sparse(1)
    cfg = Qwen3MoeConfig.from_dict({**BASE, "rope_theta": 1000000, "mlp_only_layers": None})
    assert cfg.rope_theta == 1e6 and isinstance(cfg.rope_theta, float) and cfg.mlp_only_layers == []


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="object"):
        Qwen3MoeConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("act,name", [("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                      ("gelu_new", "gelu_tanh"), ("relu", "relu")])
def test_activations_the_kernels_compute_are_accepted(act, name):
    cfg = Qwen3MoeConfig.from_dict({**BASE, "hidden_act": act})
    assert cfg.hidden_act == act and cfg.activation == name
