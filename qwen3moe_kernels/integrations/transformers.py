"""Drop-in for Hugging Face transformers' Qwen3-MoE models (transformers 5.17 to 5.25).

* :func:`register` adds ``"qwen3moe_kernels"`` to transformers' experts interface, so
  ``from_pretrained(..., experts_implementation="qwen3moe_kernels")`` runs the experts with ``ops.moe_experts``.
* :func:`apply` patches a ``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel`` in place: the experts through that interface,
  and routers (``ops.router_topk``), RMSNorms, q/k-norm + RoPE and each layer's residual add + norm by giving those
  module instances a subclass of their transformers class; :func:`revert` undoes it.
* :class:`SparseMoeBlock` (``from_hf``) is our block module over theirs.

What stays as transformers does it (hooks, activation checkpointing, the experts interface, fallbacks) and what a
hook can observe differently: ``docs/integrations.md``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from ..recorder import fallback

EXPERTS_IMPLEMENTATION = "qwen3moe_kernels"
_BASE = "_qwen3moe_kernels_base"  # on a patched subclass: the transformers class it patches
_PREVIOUS_EXPERTS = "_qwen3moe_kernels_previous_experts"  # on a patched model: its experts implementation before


def _hf():
    try:
        from transformers.models.qwen3_moe import modeling_qwen3_moe
    except ImportError as exc:  # an optional dependency: say what to install
        raise ImportError(
            "qwen3moe_kernels.integrations.transformers needs transformers>=5.17 (pip install 'transformers>=5.17')"
        ) from exc
    return modeling_qwen3_moe


# ------------------------------------------------------------------------------------------- experts


def _layout_problems(experts: nn.Module) -> list[str]:
    """What an experts module has that the kernels do not compute (Qwen3-MoE's own experts have none of it)."""
    from transformers.integrations.moe import _default_apply_gate

    checks = (("has_gate", True, "no gate projection"), ("has_bias", False, "biases"),
              ("is_transposed", False, "transposed weights"), ("is_concatenated", True, "interleaved gate/up rows"),
              ("has_post_expert_norm", False, "a post-expert norm"))
    problems = [why for attr, ok, why in checks if getattr(experts, attr, ok) != ok]
    gate = getattr(experts, "_apply_gate", None)  # the gated product act(gate) * up, unless a model defines its own
    if getattr(gate, "__func__", gate) is not _default_apply_gate:
        problems.append("its own _apply_gate")
    return problems


@functools.cache
def _kernel_activations() -> dict[type, str]:
    """transformers' activation classes (``ACT2CLS``) that compute one of the kernels' activations, by class."""
    from transformers.activations import ACT2CLS

    classes = {}
    for name, kernel_name in reference.HF_ACTIVATIONS.items():
        cls = ACT2CLS[name][0] if isinstance(ACT2CLS[name], tuple) else ACT2CLS[name]
        classes[cls] = kernel_name
    return classes


def kernel_activation(experts: nn.Module):
    """The activation name the kernels take for this experts module's ``act_fn`` (what transformers' own experts
    call: its class, whatever the config names), else the ``act_fn`` itself, which runs the reference, visibly."""
    act_fn = getattr(experts, "act_fn", None)
    return _kernel_activations().get(type(act_fn), act_fn)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: ``(experts module, x [T, H], ids [T, k], weights [T, k]) -> [T, H]``.

    Under transformers' expert parallelism (``_is_expert_parallel``) a slot owned by another rank carries the
    sentinel id ``num_local_experts`` and weight 0: it contributes nothing, forward or backward, and costs nothing
    (:func:`_owned_slots_only`)."""
    problems = _layout_problems(self)
    if problems:  # not a Qwen3-MoE experts module: its own implementation, visibly
        fallback("moe_experts", f"{type(self).__name__} has {', '.join(problems)}: transformers' eager experts")
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    if getattr(self, "_is_expert_parallel", False):
        owned = top_k_index < self.gate_up_proj.shape[0]  # [T, k]
        if not bool(owned.all()):  # one host read per layer: the compaction needs the owned slot count
            return _owned_slots_only(self, hidden_states, top_k_index, top_k_weights, owned)
    # the package's conventions: int32 expert ids, fp32 routing weights (exact from transformers' bf16 weights)
    return ops.moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32),
                           top_k_weights.float(), activation=kernel_activation(self))


def _owned_slots_only(self, x, ids, weights, owned):
    """The experts over this rank's slots only: the N owned slots as N one-slot tokens ``[N, H]`` through
    ``ops.moe_experts`` (each row its slot's weighted product, rounded to x's dtype, as with k slots), put back in
    slot order with zeros for the sentinels, and each token's k slots summed in fp32 in the order j = 0..k-1: the
    unsharded call's rounding, slot by slot. The sentinel slots are never computed (with
    world ranks, (world-1)/world of all slots in transformers' all-reduce mode), so a non-finite input row cannot
    leak through ``0 * inf``; their weights get a zero gradient."""
    T, k = ids.shape
    slot = owned.reshape(-1).nonzero().squeeze(1)  # [N] owned slots, in slot order
    tok = torch.div(slot, k, rounding_mode="floor")
    y = ops.moe_experts(x[tok], self.gate_up_proj, self.down_proj, ids.reshape(-1)[slot, None].to(torch.int32),
                        weights.reshape(-1)[slot, None].float(), activation=kernel_activation(self))  # [N, H]
    rows = y.new_zeros((T * k, x.shape[1])).index_copy(0, slot, y).view(T, k, -1)  # [T, k, H]
    out = rows[:, 0].float()
    # fp32, j in order, as the kernels sum the k slots (adding a sentinel's 0 is exact): sum_slots' arithmetic, in
    # torch ops because it must be differentiable and the moe_unpermute op has no backward
    for j in range(1, k):
        out = out + rows[:, j].float()
    return out.to(x.dtype)


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


@functools.cache
def _cache_kwarg() -> str:
    """The attention's KV-cache argument: ``cache`` (transformers >= 5.2x, whose ``update`` takes the call's kwargs)
    or ``past_key_values`` (5.17-5.1x, ``update(k, v, layer_idx)``)."""
    return "cache" if "cache" in inspect.signature(_hf().Qwen3MoeAttention.forward).parameters else "past_key_values"


def _must_call(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its forward on its own weight: hooks (its own or global ones, e.g.
    a user's, or accelerate's offload hook, which brings the weight in from ``meta``) or a replaced ``forward``.
    Then a fused kernel must not read its weight directly: the module is called, as transformers calls it."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks
                or "forward" in module.__dict__ or module.weight.is_meta)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs):
    """Qwen3MoeAttention.forward with q_norm/k_norm + RoPE fused; everything else as transformers does it."""
    hf = _hf()
    name = _cache_kwarg()
    cache = args[0] if args else kwargs.pop(name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)  # [B, S, Hq, D]: the layout qk_norm_rope takes
    k = self.k_proj(hidden_states).view(hidden_shape)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings  # [B or 1, S, D]
    if _must_call(self.q_norm) or _must_call(self.k_norm):  # hooks or offload on a norm: call the modules
        q, k = reference.rope(self.q_norm(q), self.k_norm(k), cos, sin)
    elif self.q_norm.variance_epsilon == self.k_norm.variance_epsilon:
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.variance_epsilon)
    else:  # one eps per call in the fused op; never the case in released configs, but stay exact
        q, k = ops.rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon), ops.rms_norm(
            k, self.k_norm.weight, self.k_norm.variance_epsilon)
        q, k = reference.rope(q, k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        if name == "cache":
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        else:
            k, v = cache.update(k, v, self.layer_idx)
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


def _decoder_layer_forward(self, hidden_states, **kwargs):
    """Qwen3MoeDecoderLayer.forward with the residual add and post-attention RMSNorm fused; the attention gets the
    layer's keyword arguments as transformers passes them (their names differ between versions)."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    norm = self.post_attention_layernorm
    if _must_call(norm):  # hooks or offload on the norm: call it, as transformers does
        residual = residual + hidden_states
        hidden_states = norm(residual)
    else:
        hidden_states, residual = ops.fused_add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


# --------------------------------------------------------------------------------------------- apply


@functools.cache
def _patched_class(base: type, forward) -> type:
    """``base`` with our ``forward``: a subclass, so that what transformers does around a module's forward still
    happens, e.g. ``GradientCheckpointingLayer`` wrapping every subclass's forward in its checkpoint function (an
    instance attribute ``forward`` would bypass it). Same name, so repr and name-based lookups are unchanged."""
    return type(base.__name__, (base,), {"forward": forward, "__qualname__": base.__qualname__,
                                         "__module__": __name__, _BASE: base})


def _require_qwen3_moe(model: Any) -> None:
    hf = _hf()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, hf.Qwen3MoePreTrainedModel) or model_type != "qwen3_moe":
        raise TypeError(
            "qwen3moe_kernels.integrations.transformers.apply() patches Hugging Face Qwen3-MoE models "
            "(a transformers Qwen3MoePreTrainedModel such as Qwen3MoeForCausalLM, config.model_type 'qwen3_moe'); "
            f"got {type(model).__module__}.{type(model).__name__} with model_type {model_type!r}"
        )


def apply(model, *, moe: bool = True, rms_norm: bool = True, qk_norm_rope: bool = True,
          add_rms_norm: bool = True):
    """Patch a transformers Qwen3-MoE model in place to run our kernels; returns the same model.

    The experts switch to ``experts_implementation="qwen3moe_kernels"`` (so a later ``set_experts_implementation``
    picks what it names); routers, RMSNorms, attentions and decoder layers get a subclass of their class whose
    forward calls our ops. The switches leave a kind of module as transformers wrote it (for bisecting a
    difference); ``moe`` covers the routers and the experts. Raises ``TypeError`` for a model that is not
    Qwen3-MoE. Calling it twice is harmless.
    """
    hf = _hf()
    _require_qwen3_moe(model)
    wanted = {
        hf.Qwen3MoeTopKRouter: (moe, _router_forward),
        hf.Qwen3MoeRMSNorm: (rms_norm, _rms_norm_forward),
        hf.Qwen3MoeAttention: (qk_norm_rope, _attention_forward),
        hf.Qwen3MoeDecoderLayer: (add_rms_norm, _decoder_layer_forward),
    }
    counts = {cls.__name__: 0 for cls in wanted}
    for module in model.modules():
        on, forward = wanted.get(type(module), (False, None))
        if on:
            module.__class__ = _patched_class(type(module), forward)
            counts[type(module).__name__] += 1
    experts = sum(isinstance(m, hf.Qwen3MoeExperts) for m in model.modules())
    if moe and experts:
        if _PREVIOUS_EXPERTS not in model.__dict__:
            model.__dict__[_PREVIOUS_EXPERTS] = model.config._experts_implementation
        model.set_experts_implementation(register())
    counts["Qwen3MoeExperts"] = experts if moe else 0
    if not any(counts.values()):
        raise ValueError(f"found no Qwen3-MoE modules to patch in {type(model).__name__}")
    model._qwen3moe_kernels_patch_counts = counts
    return model


def revert(model):
    """Undo :func:`apply`: transformers' own classes and the experts implementation the model had. Returns it."""
    for module in model.modules():
        base = getattr(type(module), _BASE, None)
        if base is not None and type(module).__module__ == __name__:
            module.__class__ = base
    previous = model.__dict__.pop(_PREVIOUS_EXPERTS, None)
    if previous is not None and model.config._experts_implementation == EXPERTS_IMPLEMENTATION:
        model.set_experts_implementation(previous)
    model.__dict__.pop("_qwen3moe_kernels_patch_counts", None)
    return model


def is_patched(model) -> bool:
    """Whether :func:`apply` patched any module of ``model`` (and it was not reverted)."""
    return _PREVIOUS_EXPERTS in model.__dict__ or any(
        getattr(type(m), _BASE, None) is not None for m in model.modules())


# ------------------------------------------------------------------------------------------- our block


class SparseMoeBlock(nn.Module):
    """The Qwen3-MoE sparse block (router + top-k + SwiGLU experts) on the fused backend.

    ``forward(x [..., H]) -> out [..., H]`` (and ``router_logits [N, E]`` too with ``return_router_logits``).
    Weights in transformers' layout: ``router_weight [E, H]``, ``w_gate_up [E, 2I, H]``, ``w_down [E, H, I]``.
    """

    def __init__(self, router_weight: nn.Parameter, w_gate_up: nn.Parameter, w_down: nn.Parameter, top_k: int,
                 renormalize: bool = True, return_router_logits: bool = False, activation="silu"):
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
        self.activation = activation  # a name the ops take, or a callable (the reference runs it)

    @classmethod
    def from_hf(cls, block: nn.Module, return_router_logits: bool = False) -> "SparseMoeBlock":
        """Our block over a transformers ``Qwen3MoeSparseMoeBlock``'s own Parameters (shared, not copied)."""
        hf = _hf()
        if not isinstance(block, hf.Qwen3MoeSparseMoeBlock):
            raise TypeError(f"SparseMoeBlock.from_hf expects a transformers Qwen3MoeSparseMoeBlock, got "
                            f"{type(block).__module__}.{type(block).__name__}")
        return cls(block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, block.gate.top_k,
                   block.gate.norm_topk_prob, return_router_logits, kernel_activation(block.experts))

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        out, logits = ops.fused_moe(hidden_states.reshape(-1, shape[-1]), self.router_weight, self.w_gate_up,
                                    self.w_down, self.top_k, self.renormalize, self.activation)
        out = out.reshape(shape)
        return (out, logits) if self.return_router_logits else out

    def extra_repr(self) -> str:
        E, two_i, H = self.w_gate_up.shape
        return f"hidden={H}, moe_intermediate={two_i // 2}, experts={E}, top_k={self.top_k}"


__all__ = ["EXPERTS_IMPLEMENTATION", "SparseMoeBlock", "apply", "experts_forward", "is_patched", "register",
           "revert"]
