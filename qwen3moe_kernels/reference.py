"""The specification: one pure-PyTorch function per op, computed as Hugging Face transformers computes it.

Every kernel in this library is tested against the function of the same name here. Nothing in this file
depends on the rest of the package, so it can be read (and trusted) on its own.

Conventions (shared by the ops in ``qwen3moe_kernels.ops``):

* Tokens are flattened: ``x`` is ``[T, H]``. A *token-slot* is one of the ``T * k`` (token, choice) pairs;
  slot ``s = t * k + j`` is the j-th expert choice of token t.
* Router outputs: ``weights`` fp32 ``[T, k]`` and ``ids`` int32 ``[T, k]``, ordered by descending probability,
  ties broken by the lowest expert id (``torch.topk`` does not promise an order for ties; we do).
* Expert weights are stacked as transformers stores them: ``w_gate_up [E, 2I, H]`` (gate rows first, then
  up rows) and ``w_down [E, H, I]``.
* Expert-sorted order: ``sorted_slots [T*k]`` lists the slots grouped by expert (stable: ascending slot id
  within an expert), ``offsets [E+1]`` the start of each expert's group, ``inv [T*k]`` the position of each
  slot in that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------- router


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax over experts, top-k, optional renormalisation.

    Returns ``(weights fp32 [T, k], ids int32 [T, k])``. Ties are broken by the lowest expert id: we sort by
    (probability descending, id ascending), which is what a stable descending sort gives. A row with a NaN
    logit has NaN probabilities everywhere (softmax propagates it); NaN sorts as the largest value, as in
    ``torch.sort``/``torch.topk``, so such a row selects its NaN experts first, lowest id first.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, as transformers' ``load_balancing_loss_func`` computes it.

    ``router_logits`` holds one ``[B*S, E]`` tensor per sparse layer. The loss is
    ``E * sum_e f_e * P_e`` with f_e the fraction of (token, choice) assignments to expert e and P_e the mean
    router probability of e, both averaged over the non-padding tokens of every layer.

    As in transformers, the softmax runs in the logits' dtype (no fp32 upcast, unlike ``router_topk``) and the
    top-k choice is made on those probabilities; the counts and probability sums accumulate in fp32. So a bf16
    model's aux loss is computed from bf16 probabilities, exactly as transformers computes it.
    """
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for layer_logits in router_logits:
        probs = torch.softmax(layer_logits.to(device), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        if attention_mask is None:
            mask = torch.ones(probs.shape[0], dtype=torch.float32, device=device)
        else:
            mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs.float() * mask[:, None]).sum(dim=0)
        rows = rows + mask.sum()
    # counts are per assignment, so sum_e f_e == top_k, as in transformers.
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


# ---------------------------------------------------------------------------------------- permutation


def moe_sort(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k token-slots by expert, stably. Returns ``(sorted_slots, inv, offsets)``, all int32."""
    flat = ids.reshape(-1).long()
    sorted_slots = torch.sort(flat, stable=True).indices
    inv = torch.empty_like(sorted_slots)
    inv[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return sorted_slots.int(), inv.int(), offsets.int()


def moe_align_block(
    ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-sorted slots, each expert's group padded to a multiple of ``block_size``.

    Returns ``(padded_slots [P_max], block_expert [P_max // block_size], num_padded [1])`` where
    ``P_max = T*k + E*(block_size-1)`` rounded up to ``block_size`` is a bound known without reading ``ids``
    (so a GPU needs no host sync). Padding slots hold the sentinel ``T*k``; blocks past ``num_padded`` have
    expert ``-1``. An expert with no slots gets no block.
    """
    numel = ids.numel()
    sorted_slots, _, offsets = moe_sort(ids, num_experts)
    counts = (offsets[1:] - offsets[:-1]).long()
    padded_counts = (counts + block_size - 1) // block_size * block_size
    p_max = (numel + num_experts * (block_size - 1) + block_size - 1) // block_size * block_size
    padded = torch.full((p_max,), numel, dtype=torch.int32, device=ids.device)
    block_expert = torch.full((p_max // block_size,), -1, dtype=torch.int32, device=ids.device)
    start = 0
    for e in range(num_experts):
        c, pc = int(counts[e]), int(padded_counts[e])
        padded[start : start + c] = sorted_slots[int(offsets[e]) : int(offsets[e]) + c]
        block_expert[start // block_size : (start + pc) // block_size] = e
        start += pc
    return padded, block_expert, torch.tensor([start], dtype=torch.int32, device=ids.device)


def moe_permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of ``x [T, H]`` in expert order: ``out[i] = x[sorted_slots[i] // top_k]``, ``[T*k, H]``."""
    return x[sorted_slots.long() // top_k]


def moe_unpermute(y: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Weighted combine: ``out[t] = sum_j weights[t, j] * y[inv[t*k + j]]`` in fp32 (float64 for float64 y), cast
    to ``y.dtype``."""
    T, k = weights.shape
    acc = torch.promote_types(y.dtype, torch.float32)
    rows = y[inv.long()].to(acc).reshape(T, k, y.shape[-1])  # explicit H: T = 0 is ambiguous with -1
    return (rows * weights.to(acc)[:, :, None]).sum(dim=1).to(y.dtype)


# -------------------------------------------------------------------------------------------- experts


# The gate activations the kernels compute, by the names the ops take; transformers' ``hidden_act`` names map onto
# them in integrations/transformers.py. The experts and the dense MLP take one of these names or any callable.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # erf
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# transformers' hidden_act names (ACT2FN) of the activations above, by our name
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu"}


def activation_fn(activation):
    """The function of an activation name of :data:`ACTIVATIONS`, or ``activation`` itself if it is callable."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable, got {activation!r}")
    return ACTIVATIONS[activation]


def swiglu(gate_up: torch.Tensor, activation="silu") -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up = [..., 2I]`` holding gate in the first half, as transformers chunks it
    (SiLU: SwiGLU, Qwen3's)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return activation_fn(activation)(gate) * up


def moe_experts(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    activation="silu",
) -> torch.Tensor:
    """The experts of the sparse block exactly as transformers' eager ``Qwen3MoeExperts`` loop computes them.

    ``weights`` is cast to ``x.dtype`` first (transformers' router returns them in the model dtype); each
    expert runs on its tokens in the model dtype and the results are accumulated with ``index_add_`` into a
    buffer of ``x.dtype``. ``activation``: a name of :data:`ACTIVATIONS` or a callable (transformers' ``act_fn``).
    """
    out = torch.zeros_like(x)
    weights = weights.to(x.dtype)
    ids = ids.long()
    for e in torch.unique(ids).tolist():
        token, choice = torch.where(ids == e)
        h = swiglu(F.linear(x[token], w_gate_up[e]), activation)
        y = F.linear(h, w_down[e]) * weights[token, choice, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    activation="silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router linear + router_topk + experts, for ``x [T, H]``. Returns ``(out [T, H], router_logits [T, E])``."""
    logits = F.linear(x, router_weight)
    weights, ids = router_topk(logits, top_k, renormalize)
    return moe_experts(x, w_gate_up, w_down, ids, weights, activation), logits


def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
        activation="silu") -> torch.Tensor:
    """The dense gated MLP of the ``mlp_only_layers`` (SwiGLU by default)."""
    return F.linear(activation_fn(activation)(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# -------------------------------------------------------------------------------------- norms and rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, then ``weight * normed.to(x.dtype)`` (Qwen3MoeRMSNorm)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = residual + x`` (in the input dtype, as the decoder layer adds), then ``rms_norm``.

    Returns ``(normed, new_residual)``.
    """
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default RoPE tables for ``position_ids [B, S]``: ``cos, sin [B, S, head_dim]`` in ``dtype``.

    Frequencies in fp32 exactly as Qwen3MoeRotaryEmbedding computes them; the half-dim table is repeated
    (neox / rotate-half layout).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE for ``q [B, S, Hq, D]``, ``k [B, S, Hk, D]`` with ``cos, sin [B, S, D]``.

    Computed in the dtype of q/k as transformers' ``apply_rotary_pos_emb`` does (heads are dim 2 here,
    transformers' ``unsqueeze_dim=2`` form).
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 attention prologue: per-head RMSNorm of q and k (over head_dim), then RoPE. Layout as ``rope``."""
    return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


# ------------------------------------------------------------------------------------------ attention


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Eager GQA attention as transformers' ``eager_attention_forward``.

    ``q [B, Hq, S, D]``, ``k, v [B, Hk, L, D]``; ``mask`` is additive ``[B, 1, S, L]`` (0 or -inf-like) or
    None. Softmax in fp32, cast back. Returns ``[B, S, Hq, D]``.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def causal_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, S, past+S]``: causal, and padding keys (attention_mask == 0) masked out."""
    total = past_len + query_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM loss as transformers' ``ForCausalLMLoss``: shift by one, fp32 logits, mean over valid labels."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)

