"""Drop-in for Hugging Face transformers' Qwen3-MoE models.

* :func:`register` adds ``"qwen3moe_kernels"`` to transformers' experts interface, so
  ``from_pretrained(..., experts_implementation="qwen3moe_kernels")`` runs the experts with ``ops.moe_experts``.
* :func:`apply` patches a ``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel`` in place: routers (``ops.router_topk``),
  experts (``ops.moe_experts``), RMSNorms, q/k-norm + RoPE and each layer's residual add + norm; :func:`revert`
  undoes it. Only module instances are patched; their own ``nn.Parameter``s are read on every call.
* :class:`SparseMoeBlock` (``from_hf``) is our block module over theirs.

What stays as transformers does it (hooks, mixed-precision fallbacks) and what a hook can observe differently is
in ``docs/integrations.md``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference

EXPERTS_IMPLEMENTATION = "qwen3moe_kernels"
_PATCHED = "_qwen3moe_kernels_patched"


def _hf():
    try:
        from transformers.models.qwen3_moe import modeling_qwen3_moe
    except ImportError as exc:  # an optional dependency: say what to install
        raise ImportError(
            "qwen3moe_kernels.integrations.transformers needs transformers>=5 (pip install 'transformers>=5')"
        ) from exc
    return modeling_qwen3_moe


# ------------------------------------------------------------------------------------------- experts


def _check_experts_layout(experts: nn.Module) -> None:
    problems = []
    if not getattr(experts, "has_gate", True):
        problems.append("no gate projection")
    if getattr(experts, "has_bias", False):
        problems.append("biases")
    if getattr(experts, "is_transposed", False):
        problems.append("transposed weights")
    if not getattr(experts, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if getattr(experts, "_is_expert_parallel", False):
        problems.append("expert parallelism")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act != "silu":
        problems.append(f"activation {act!r}")
    if problems:
        raise NotImplementedError(
            f"experts_implementation={EXPERTS_IMPLEMENTATION!r} computes Qwen3-MoE experts (stacked [gate; up] "
            f"weights [E, 2I, H], down [E, H, I], SiLU, no bias); {type(experts).__name__} has {', '.join(problems)}"
        )


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: ``(experts module, x [T, H], ids [T, k], weights [T, k]) -> [T, H]``."""
    _check_experts_layout(self)
    # the package's conventions: int32 expert ids, fp32 routing weights (exact from transformers' bf16 weights)
    return ops.moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32),
                           top_k_weights.float())


def register(name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Add our experts to transformers' experts interface under ``name``; returns the name. Idempotent."""
    _hf()
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, experts_forward)
    return name


# --------------------------------------------------------------------------------------- patched forwards


def _router_forward(self, hidden_states: torch.Tensor):
    """Qwen3MoeTopKRouter.forward: ``(logits [T, E], weights [T, k] in the logits' dtype, ids int32 [T, k])``.

    The linear layer as transformers computes it, then the top-k with the ``router_topk`` op. With a gradient
    needed the differentiable reference routing runs instead (the op has no backward), as ``fused_moe`` does.
    """
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(x, self.weight)
    if torch.is_grad_enabled() and logits.requires_grad:
        weights, ids = reference.router_topk(logits, self.top_k, self.norm_topk_prob)
    else:
        weights, ids = ops.router_topk(logits, self.top_k, self.norm_topk_prob)  # reports its own fallbacks
    return logits, weights.to(logits.dtype), ids


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """Qwen3MoeAttention.forward with q_norm/k_norm + RoPE fused; everything else as transformers does it."""
    hf = _hf()
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)  # [B, S, Hq, D]: the layout qk_norm_rope takes
    k = self.k_proj(hidden_states).view(hidden_shape)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings  # [B or 1, S, D]
    if self.q_norm.variance_epsilon == self.k_norm.variance_epsilon:
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.variance_epsilon)
    else:  # one eps per call in the fused op; never the case in released configs, but stay exact
        q, k = ops.rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon), ops.rms_norm(
            k, self.k_norm.weight, self.k_norm.variance_epsilon)
        q, k = reference.rope(q, k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attention_interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, hf.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=self.sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                           position_embeddings=None, **kwargs):
    """Qwen3MoeDecoderLayer.forward with the residual add and post-attention RMSNorm fused."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    hidden_states, residual = ops.fused_add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


# --------------------------------------------------------------------------------------------- apply


def _require_qwen3_moe(model: Any) -> None:
    hf = _hf()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, hf.Qwen3MoePreTrainedModel) or model_type != "qwen3_moe":
        raise TypeError(
            "qwen3moe_kernels.integrations.transformers.apply() patches Hugging Face Qwen3-MoE models "
            "(a transformers Qwen3MoePreTrainedModel such as Qwen3MoeForCausalLM, config.model_type 'qwen3_moe'); "
            f"got {type(model).__module__}.{type(model).__name__} with model_type {model_type!r}"
        )
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"qwen3moe_kernels computes SiLU experts; this Qwen3-MoE config has hidden_act={act!r}")


def apply(model, *, moe: bool = True, rms_norm: bool = True, qk_norm_rope: bool = True,
          add_rms_norm: bool = True):
    """Patch a transformers Qwen3-MoE model in place to run the fused backend; returns the same model.

    The switches leave a kind of module as transformers wrote it (for bisecting a difference); ``moe`` covers the
    routers and the experts modules (the MoE block itself always keeps transformers' forward). Raises
    ``TypeError`` for a model that is not Qwen3-MoE. Calling it twice is harmless.
    """
    hf = _hf()
    _require_qwen3_moe(model)
    wanted = {
        hf.Qwen3MoeTopKRouter: (moe, _router_forward),
        hf.Qwen3MoeExperts: (moe, experts_forward),
        hf.Qwen3MoeRMSNorm: (rms_norm, _rms_norm_forward),
        hf.Qwen3MoeAttention: (qk_norm_rope, _attention_forward),
        hf.Qwen3MoeDecoderLayer: (add_rms_norm, _decoder_layer_forward),
    }
    counts = {cls.__name__: 0 for cls in wanted}
    for module in model.modules():
        for cls, (on, forward) in wanted.items():
            if on and type(module) is cls:
                if cls is hf.Qwen3MoeExperts:
                    _check_experts_layout(module)
                module.forward = types.MethodType(forward, module)
                setattr(module, _PATCHED, True)
                counts[cls.__name__] += 1
    if not any(counts.values()):
        raise ValueError(f"found no Qwen3-MoE modules to patch in {type(model).__name__}")
    model._qwen3moe_kernels_patch_counts = counts
    return model


def revert(model):
    """Undo :func:`apply`: the patched modules run transformers' own forward again. Returns the model."""
    for module in model.modules():
        if module.__dict__.pop(_PATCHED, False):
            module.__dict__.pop("forward", None)
    model.__dict__.pop("_qwen3moe_kernels_patch_counts", None)
    return model


def is_patched(model) -> bool:
    return any(getattr(m, _PATCHED, False) for m in model.modules())


# ------------------------------------------------------------------------------------------- our block


class SparseMoeBlock(nn.Module):
    """The Qwen3-MoE sparse block (router + top-k + SwiGLU experts) on the fused backend.

    ``forward(x [..., H]) -> out [..., H]`` (and ``router_logits [N, E]`` too with ``return_router_logits``).
    Weights in transformers' layout: ``router_weight [E, H]``, ``w_gate_up [E, 2I, H]``, ``w_down [E, H, I]``.
    """

    def __init__(self, router_weight: nn.Parameter, w_gate_up: nn.Parameter, w_down: nn.Parameter, top_k: int,
                 renormalize: bool = True, return_router_logits: bool = False):
        super().__init__()
        E, two_i, H = w_gate_up.shape
        if router_weight.shape != (E, H) or w_down.shape != (E, H, two_i // 2) or two_i % 2:
            raise ValueError(
                f"expected router_weight [E, H], w_gate_up [E, 2I, H], w_down [E, H, I]; got "
                f"{tuple(router_weight.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}"
            )
        if not 0 < top_k <= E:
            raise ValueError(f"top_k must be in [1, {E}] (the number of experts), got {top_k}")
        self.router_weight, self.w_gate_up, self.w_down = router_weight, w_gate_up, w_down
        self.top_k, self.renormalize, self.return_router_logits = top_k, renormalize, return_router_logits

    @classmethod
    def from_hf(cls, block: nn.Module, return_router_logits: bool = False) -> "SparseMoeBlock":
        """Our block over a transformers ``Qwen3MoeSparseMoeBlock``'s own Parameters (shared, not copied)."""
        hf = _hf()
        if not isinstance(block, hf.Qwen3MoeSparseMoeBlock):
            raise TypeError(f"SparseMoeBlock.from_hf expects a transformers Qwen3MoeSparseMoeBlock, got "
                            f"{type(block).__module__}.{type(block).__name__}")
        _check_experts_layout(block.experts)
        return cls(block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, block.gate.top_k,
                   block.gate.norm_topk_prob, return_router_logits)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        out, logits = ops.fused_moe(hidden_states.reshape(-1, shape[-1]), self.router_weight, self.w_gate_up,
                                    self.w_down, self.top_k, self.renormalize)
        out = out.reshape(shape)
        return (out, logits) if self.return_router_logits else out

    def extra_repr(self) -> str:
        E, two_i, H = self.w_gate_up.shape
        return f"hidden={H}, moe_intermediate={two_i // 2}, experts={E}, top_k={self.top_k}"


__all__ = ["EXPERTS_IMPLEMENTATION", "SparseMoeBlock", "apply", "experts_forward", "is_patched", "register",
           "revert"]
