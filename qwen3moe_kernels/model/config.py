"""Qwen3MoeConfig: the model's hyper-parameters, read from a Hugging Face ``config.json``.

Accepts both spellings real files use (``num_experts`` / ``num_local_experts``; ``rope_theta`` /
``rope_parameters = {"rope_type": "default", "rope_theta": ...}``). Values we cannot honour (RoPE scaling,
sliding windows, an activation other than SiLU) or that contradict each other raise ``ValueError``; HF
bookkeeping keys (architectures, torch_dtype, token ids, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class Qwen3MoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    attention_bias: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "decoder_sparse_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Qwen3MoeConfig.{name} must be a positive int, got {v!r}")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Qwen3MoeConfig.{name} must be a non-negative int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]"
            )
        bad = [i for i in self.mlp_only_layers if not (isinstance(i, int) and 0 <= i < self.num_hidden_layers)]
        if bad:
            raise ValueError(f"mlp_only_layers entries must be layer indices in [0, {self.num_hidden_layers}), got {bad}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has the MoE block (else the dense MLP), as transformers decides."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    # ------------------------------------------------------------------------------------ reading
    _IGNORED = frozenset({
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
        "eos_token_id", "pad_token_id", "use_cache", "output_router_logits", "initializer_range",
        "attention_dropout", "max_window_layers", "_name_or_path", "use_sliding_window", "sliding_window",
        "layer_types", "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
        "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "pruned_heads",
        "tie_encoder_decoder", "use_return_dict", "qkv_bias", "num_labels", "task_specific_params",
    })

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3MoeConfig":
        d = dict(d)
        if d.get("model_type", "qwen3_moe") != "qwen3_moe":
            raise ValueError(f"config model_type must be 'qwen3_moe', got {d['model_type']!r}")
        if "num_local_experts" in d:
            n = d.pop("num_local_experts")
            if "num_experts" in d and d["num_experts"] != n:
                raise ValueError(f"num_experts ({d['num_experts']}) and num_local_experts ({n}) disagree")
            d["num_experts"] = n
        rope = d.pop("rope_parameters", None)
        scaling = d.pop("rope_scaling", None)
        for r in (rope, scaling):
            if r is None:
                continue
            if not isinstance(r, dict):
                raise ValueError(f"rope_parameters/rope_scaling must be a dict, got {r!r}")
            kind = r.get("rope_type", r.get("type", "default"))
            if kind != "default":
                raise ValueError(f"rope_type {kind!r} is not supported (only 'default' RoPE)")
            if "rope_theta" in r:
                if "rope_theta" in d and float(d["rope_theta"]) != float(r["rope_theta"]):
                    raise ValueError(f"rope_theta ({d['rope_theta']}) and rope_parameters.rope_theta "
                                     f"({r['rope_theta']}) disagree")
                d["rope_theta"] = r["rope_theta"]
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {d['hidden_act']!r}")
        d.pop("hidden_act", None)
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls._IGNORED)
        if unknown:
            raise ValueError(f"unknown Qwen3-MoE config keys: {unknown}")
        kwargs = {k: v for k, v in d.items() if k in names}
        if "rope_theta" in kwargs:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen3MoeConfig":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Qwen3MoeConfig":
        return cls.from_json(os.path.join(directory, "config.json"))
