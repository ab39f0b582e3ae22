"""Qwen3MoeConfig: the model's hyper-parameters, read from a Hugging Face ``config.json``.

Every default is transformers' ``Qwen3MoeConfig`` default (not a released checkpoint's: e.g.
``norm_topk_prob=False``, ``rope_theta=10000``, 24 layers), so a ``config.json`` that leaves a key out means
here what it means to transformers. ``head_dim=None`` is ``hidden_size // num_attention_heads``, as
transformers' modeling reads it.

Accepts both spellings real files use (``num_experts`` / ``num_local_experts``; ``rope_theta`` /
``rope_parameters = {"rope_type": "default", "rope_theta": ...}``). Every field is checked: a value of the
wrong type (``"false"`` for a bool, ``True`` or ``2.0`` for an int, ``"x"`` for a number) raises ``TypeError``;
values out of range, that we cannot honour (RoPE scaling, sliding windows, an activation the kernels do not compute) or
that contradict each other raise ``ValueError``. Both name the key. HF bookkeeping keys (architectures,
torch_dtype, token ids, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from ..reference import HF_ACTIVATIONS

# Field kinds, for the per-field checks (the rest is checked by hand in validate).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "max_position_embeddings", "decoder_sparse_step")
# Zero is meaningful for these (num_experts=0: every layer dense); validate requires > 0 where they are used.
_NON_NEGATIVE_INTS = ("intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok")
_BOOLS = ("attention_bias", "norm_topk_prob", "tie_word_embeddings")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass, but True is no layer count


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Qwen3MoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # transformers' name; one of reference.HF_ACTIVATIONS

    def __post_init__(self) -> None:
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []  # transformers' default
        self._check_fields()  # before the defaults below compute with the values
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.rms_norm_eps, self.rope_theta = float(self.rms_norm_eps), float(self.rope_theta)
        self.router_aux_loss_coef = float(self.router_aux_loss_coef)
        self.validate()

    def _check_fields(self) -> None:
        """Each field on its own: its type, and the range that does not depend on other fields."""
        def fail(name, expected, error=ValueError):
            raise error(f"Qwen3MoeConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS + ("head_dim",):
            v = getattr(self, name)
            if name == "head_dim" and v is None:
                continue  # __post_init__ fills it in
            zero_ok = name in _NON_NEGATIVE_INTS
            expected = "a non-negative int" if zero_ok else "a positive int"
            if not _is_int(v):
                fail(name, expected, TypeError)
            if v < (0 if zero_ok else 1):
                fail(name, expected)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool (JSON true/false)", TypeError)
        for name in _POSITIVE_NUMBERS + ("router_aux_loss_coef",):
            v = getattr(self, name)
            expected = "a positive number" if name in _POSITIVE_NUMBERS else "a finite number"
            if not _is_number(v):
                fail(name, expected, TypeError)
            if not math.isfinite(v) or (name in _POSITIVE_NUMBERS and v <= 0):
                fail(name, expected)
        layers = self.mlp_only_layers
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
            fail("mlp_only_layers", "a list of layer indices (ints)", TypeError)
        if not isinstance(self.hidden_act, str):
            fail("hidden_act", "an activation name", TypeError)
        if self.hidden_act not in HF_ACTIVATIONS:
            fail("hidden_act", f"one of {sorted(HF_ACTIVATIONS)} (the activations the kernels compute; the "
                               f"transformers drop-in runs any)")

    @property
    def activation(self) -> str:
        """The activation's name in the ops (``reference.ACTIVATIONS``)."""
        return HF_ACTIVATIONS[self.hidden_act]

    def validate(self) -> None:
        """Check every field, then the constraints between fields; raises TypeError/ValueError naming the key."""
        self._check_fields()
        if self.head_dim is None or self.head_dim < 1:
            raise ValueError(f"Qwen3MoeConfig.head_dim must be a positive int, got {self.head_dim!r} (with "
                             f"head_dim unset it is hidden_size // num_attention_heads)")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3MoeConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3MoeConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"Qwen3MoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, num_experts={self.num_experts}]")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"Qwen3MoeConfig.mlp_only_layers entries must be layer indices in "
                             f"[0, {self.num_hidden_layers}), got {bad}")
        repeated = sorted({i for i in self.mlp_only_layers if self.mlp_only_layers.count(i) > 1})
        if repeated:
            raise ValueError(f"Qwen3MoeConfig.mlp_only_layers must not repeat a layer, got {repeated} more than once")
        sparse = [self.is_sparse(i) for i in range(self.num_hidden_layers)]
        if any(sparse) and self.moe_intermediate_size == 0:
            raise ValueError("Qwen3MoeConfig.moe_intermediate_size must be positive: the model has sparse MoE layers")
        if not all(sparse) and self.intermediate_size == 0:
            raise ValueError("Qwen3MoeConfig.intermediate_size must be positive: the model has dense MLP layers")

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
                if "rope_theta" in d and d["rope_theta"] != r["rope_theta"]:  # 1e6 == 1000000: ints compare
                    raise ValueError(f"rope_theta ({d['rope_theta']}) and rope_parameters.rope_theta "
                                     f"({r['rope_theta']}) disagree")
                d["rope_theta"] = r["rope_theta"]
        if d.get("use_sliding_window") not in (None, False):  # a string "false" is no false
            raise ValueError(f"use_sliding_window must be false (sliding windows are not supported), "
                             f"got {d['use_sliding_window']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls._IGNORED)
        if unknown:
            raise ValueError(f"unknown Qwen3-MoE config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

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
