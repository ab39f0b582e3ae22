"""The thin Qwen3-MoE causal LM: short enough to read in one sitting (gpt-fast / nano-vllm style).

Two backends share one set of weights (``set_backend`` switches): ``"eager"`` calls ``qwen3moe_kernels.reference``
and matches transformers op for op; ``"fused"`` calls the same-named ``qwen3moe_kernels.ops`` (``fused_moe``, the
norms, ``qk_norm_rope``) and torch's ``scaled_dot_product_attention``. Attention and the dense MLP are torch code
(recorded in ``implementations()`` under the fused backend, so the report covers every step).

Layout: experts ``w_gate_up [E, 2I, H]`` (gate rows first), ``w_down [E, H, I]``, router ``[E, H]``; activations
``[B, S, H]``; the KV cache holds ``k, v [B, Hk, L, D]`` per layer (RoPE applied). Positions count the cache
unless ``position_ids`` says otherwise. Each layer carries ``(h, residual)`` and adds ``h`` to the residual inside
``fused_add_rms_norm``: the same float add transformers does.

Expert parallelism (``ep_group``, fused backend): each rank holds the full model but only its experts
``[r*E/world, (r+1)*E/world)`` (``w_gate_up [E/world, 2I, H]``, ``w_down [E/world, H, I]``) and runs its own batch;
attention is data-parallel, each MoE layer exchanges the routed rows (``qwen3moe_kernels.parallel``,
``docs/parallel.md``). Every rank must run the same forward/generate calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops as fused  # the fused backend: reference's functions, on our kernels
from .. import reference
from ..recorder import record
from .config import Qwen3MoeConfig

BACKENDS = {"eager": reference, "fused": fused}


def _record_torch(ops, op: str, impl: str) -> None:
    """Report an op that runs plain torch code under the fused backend too, so implementations() is complete.

    Not a fallback (there is no kernel to fall back from); skipped while compiling, where it would only be traced.
    """
    if ops is fused and not torch.compiler.is_compiling():
        record(op, impl)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: "KVCache | None" = None


class KVCache:
    """Per-layer K/V tensors ``[B, Hk, L, D]``, grown by concatenation."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layers[layer] is not None:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int):
        super().__init__()
        self.layer, self.hq, self.hk, self.d = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNormWeight(self.d)
        self.k_norm = RMSNormWeight(self.d)

    def forward(self, x, cos, sin, mask, cache, ops):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.hq, self.d)
        k = self.k_proj(x).view(B, S, self.hk, self.d)
        v = self.v_proj(x).view(B, S, self.hk, self.d).transpose(1, 2)
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if ops is fused:
            # torch's fused attention (its flash / memory-efficient kernels where it has them for this device and
            # dtype), as transformers' default "sdpa"; the eager backend spells out transformers' eager attention
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.d**-0.5,
                                                 enable_gqa=self.hq != self.hk).transpose(1, 2)
            _record_torch(ops, "attention", "torch (scaled_dot_product_attention)")
        else:
            out = reference.attention(q, k, v, mask, self.d**-0.5)
        return self.o_proj(out.reshape(B, S, self.hq * self.d))


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm weight (the backend computes the norm); named ``weight`` as in checkpoints."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class DenseMLP(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.activation = cfg.activation
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, ops):
        _record_torch(ops, "mlp", "torch (F.linear gated MLP)")
        return reference.mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                             self.activation), None


class SparseMoe(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, ep_group=None):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k, self.renormalize, self.activation = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.activation
        self.ep_group, self.first_expert = ep_group, 0
        local = E
        if ep_group is not None:  # this rank's experts only: [first_expert, first_expert + local)
            from ..parallel import expert_range

            self.first_expert, end = expert_range(E, ep_group)
            local = end - self.first_expert
        self.router_weight = nn.Parameter(torch.zeros(E, H))
        self.w_gate_up = nn.Parameter(torch.zeros(local, 2 * I, H))
        self.w_down = nn.Parameter(torch.zeros(local, H, I))

    def forward(self, x, ops):
        shape = x.shape
        ep = {} if self.ep_group is None else {"ep_group": self.ep_group}
        out, logits = ops.fused_moe(
            x.reshape(-1, shape[-1]), self.router_weight, self.w_gate_up, self.w_down, self.top_k, self.renormalize,
            self.activation, **ep
        )
        return out.reshape(shape), logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int, ep_group=None):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNormWeight(cfg.hidden_size)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size)
        self.mlp = SparseMoe(cfg, ep_group) if cfg.is_sparse(layer) else DenseMLP(cfg)

    def forward(self, h, residual, cos, sin, mask, cache, ops):
        if residual is None:
            residual, x = h, ops.rms_norm(h, self.input_layernorm.weight, self.eps)
        else:
            x, residual = ops.fused_add_rms_norm(h, residual, self.input_layernorm.weight, self.eps)
        a = self.self_attn(x, cos, sin, mask, cache, ops)
        x, residual = ops.fused_add_rms_norm(a, residual, self.post_attention_layernorm.weight, self.eps)
        m, router_logits = self.mlp(x, ops)
        return m, residual, router_logits


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, ep_group=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ep_group) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNormWeight(cfg.hidden_size)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, backend: str | None = None, ep_group=None):
        """``backend``: "eager" or "fused" (default: "eager", or "fused" with ``ep_group``: the eager reference has
        no expert-parallel form). ``ep_group``: a ``torch.distributed`` group to shard the experts over."""
        super().__init__()
        self.config = config
        self.ep_group = ep_group
        self.model = Qwen3MoeModel(config, ep_group)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_backend(backend or ("eager" if ep_group is None else "fused"))

    def set_backend(self, backend: str) -> "Qwen3MoeForCausalLM":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if self.ep_group is not None and backend != "fused":
            raise ValueError(f"expert parallelism (ep_group) runs on the fused backend; the {backend!r} backend "
                             f"computes the experts of one process only")
        self.backend = backend
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", backend=None,
                        ep_group=None) -> "Qwen3MoeForCausalLM":
        """Load a Hugging Face checkpoint directory. With ``ep_group`` only this rank's experts are read from the
        safetensors files (``model/loading.py``)."""
        from .loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, backend=backend, ep_group=ep_group)

    def _ep_agree(self, check, what: str = "Qwen3MoeForCausalLM", agree: dict | None = None) -> None:
        """Run ``check()`` (input validation); under expert parallelism every rank learns whether any rank's
        failed, or whether the ranks disagree on the ``agree`` values, and raises too, so a bad batch on one rank
        never leaves the others waiting in an exchange."""
        if self.ep_group is None:
            check()
            return
        from ..parallel import raise_together

        raise_together(check, self.ep_group, what, agree)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64/int32 tensor, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        device = self.lm_head.weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size})")

    def forward(self, input_ids, attention_mask=None, labels=None, output_router_logits=False,
                past_key_values=None, use_cache=False, position_ids=None) -> CausalLMOutput:
        """``attention_mask [B, past+S]`` (0 = padding) masks keys; ``position_ids [B or 1, S]`` default to
        ``past + arange(S)``, as transformers' forward (which, like this one, does not derive them from the mask)."""
        cfg, ops = self.config, BACKENDS[self.backend]
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(cfg.num_hidden_layers)
        past = 0 if cache is None else cache.get_seq_length()

        def check():
            self._check_input_ids(input_ids)
            B, S = input_ids.shape
            if attention_mask is not None:
                if not isinstance(attention_mask, torch.Tensor):
                    raise TypeError(f"attention_mask must be a tensor [batch, past+seq], got {type(attention_mask)}")
                if attention_mask.shape != (B, past + S):
                    raise ValueError(f"attention_mask must be [batch, past+seq] = {(B, past + S)}, "
                                     f"got {tuple(attention_mask.shape)}")
                if attention_mask.device != input_ids.device:
                    raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
            device = self.lm_head.weight.device
            if position_ids is not None and (
                    not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32)
                    or tuple(position_ids.shape) not in ((B, S), (1, S)) or position_ids.device != device):
                raise ValueError(f"position_ids must be an int64/int32 tensor [batch or 1, seq] = {(B, S)} on "
                                 f"{device}, got {getattr(position_ids, 'dtype', type(position_ids))} "
                                 f"{tuple(getattr(position_ids, 'shape', ()))}")

        self._ep_agree(check)
        B, S = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        if position_ids is None:
            positions = torch.arange(past, past + S, device=h.device)[None].expand(B, S)
        else:
            positions = position_ids
        cos, sin = reference.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        mask = reference.causal_mask(attention_mask, S, past, h.dtype, h.device)
        residual, all_router_logits = None, []
        for layer in self.model.layers:
            h, residual, router_logits = layer(h, residual, cos, sin, mask, cache, ops)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        h, _ = ops.fused_add_rms_norm(h, residual, self.model.norm.weight, cfg.rms_norm_eps)
        logits = self.lm_head(h)
        loss = aux_loss = None
        if labels is not None:
            loss = reference.cross_entropy_loss(logits, labels)
        if output_router_logits and all_router_logits:
            aux_loss = reference.load_balancing_loss(
                tuple(all_router_logits), cfg.num_experts, cfg.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + cfg.router_aux_loss_coef * aux_loss.to(loss.device)
        return CausalLMOutput(
            logits=logits, loss=loss, aux_loss=aux_loss,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
            past_key_values=cache if use_cache else None,
        )

    def _all_done(self, done: torch.Tensor) -> bool:
        """Every row finished: here, or under expert parallelism on every rank of the group."""
        if self.ep_group is None:
            return bool(done.all())
        from ..parallel.comm import gather_ints

        return all(v[0] for v in gather_ints([int(done.all())], self.ep_group))

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy (or sampled) decoding with the KV cache; returns prompt + new tokens ``[B, S + n]``.

        ``attention_mask [B, S]`` (1 = token, 0 = padding) batches prompts of different lengths, left-padded,
        and decodes them as transformers' ``generate`` does: a token's position is the number of real tokens
        before it (``cumsum(mask) - 1``, padding at 0), each new token is at the previous position + 1, and the
        padding stays masked out of attention at every step (its K/V sit in the cache, masked). Without a mask
        every token is real. A row that has produced ``eos_token_id`` is filled with ``pad_token_id`` (default:
        the eos id) from then on; decoding stops early once every row has. ``do_sample=True`` needs
        ``temperature > 0`` (transformers refuses 0 too: greedy decoding is ``do_sample=False``).
        Under expert parallelism every rank decodes its own batch with the same ``max_new_tokens`` (checked), and
        stops early only once every rank's rows have all finished.
        """
        if pad_token_id is None:
            pad_token_id = eos_token_id

        def check():
            self._check_input_ids(input_ids)
            if max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
            if do_sample and not temperature > 0:
                raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}; "
                                 f"use do_sample=False for greedy decoding")
            V = self.config.vocab_size
            for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
                # both are fed back into the model (a finished row's next input is the pad), so both must be ids
                if tok is not None and (not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < V):
                    raise ValueError(f"{name} must be a token id in [0, vocab_size={V}), got {tok!r}")
            if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                               or attention_mask.shape != input_ids.shape):
                raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask)}")

        # under expert parallelism, the same number of steps everywhere: each step's MoE layers are collectives
        self._ep_agree(check, "generate", agree={"max_new_tokens": max_new_tokens,
                                                 "eos_token_id set": eos_token_id is not None})
        positions = None
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out, cache, step = input_ids, None, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            res = self(step, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                       use_cache=True)
            cache, last = res.past_key_values, res.logits[:, -1].float()
            if do_sample:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = last.argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
                done |= nxt == eos_token_id
            step = nxt[:, None].to(input_ids.dtype)
            out = torch.cat([out, step], dim=1)
            if attention_mask is not None:  # the new token is real; the next one sits one position further
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(step.shape)], dim=1)
                positions = positions[:, -1:] + 1
            if eos_token_id is not None and self._all_done(done):
                break
        return out
