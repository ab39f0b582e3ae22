"""The transformers drop-in: a patched Qwen3-MoE model computes what the unpatched one computes.

A tiny random transformers ``Qwen3MoeForCausalLM`` (fp32, hidden 64, 2 layers, 8 experts, top-2, eager attention
and eager experts as the baseline) is run unpatched, then patched with ``apply`` (or with the registered experts
implementation), and compared: logits, loss (with the router aux loss), greedy tokens, and the gradients of every
parameter after one backward. The weights are scaled up from transformers' 0.02 init so the router actually
discriminates between experts and a routing difference would show.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf  # noqa: E402

from qwen3moe_kernels.integrations import transformers as qk_hf  # noqa: E402
from tolerances import tol  # noqa: E402

# fp32 end to end: the patched model runs the same reference arithmetic or a kernel within the "gemm" tolerance per
# matmul; through 2 layers and an lm_head the differences stay within a few times that, so the model-level check
# uses the gemm row. bf16 is compared too (below) with its own row and an argmax check tolerant of near-ties.


def tiny_config(**kw) -> Qwen3MoeConfig:
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128, rms_norm_eps=1e-6, output_router_logits=True,
        router_aux_loss_coef=0.01, tie_word_embeddings=False, attn_implementation="eager",
        experts_implementation="eager",
    )
    base.update(kw)
    return Qwen3MoeConfig(**base)


def tiny_model(dtype=torch.float32, **kw) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1: perturb so a dropped weight would show
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.to(dtype)


def batch(B=2, S=11, vocab=97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    return ids, ids.clone()


def forward_backward(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_outputs(a, b, kind="gemm", dtype=torch.float32):
    torch.testing.assert_close(b.logits, a.logits, **tol(kind, dtype))
    torch.testing.assert_close(b.loss, a.loss, **tol(kind, dtype))
    torch.testing.assert_close(b.aux_loss, a.aux_loss, **tol(kind, dtype))
    assert len(b.router_logits) == len(a.router_logits) == 2
    for ra, rb in zip(a.router_logits, b.router_logits):
        torch.testing.assert_close(rb, ra, **tol(kind, dtype))


def test_apply_same_logits_loss_and_gradients():
    model = tiny_model()
    ids, labels = batch()
    params_before = {n: p for n, p in model.named_parameters()}
    ref, ref_grads = forward_backward(model, ids, labels)

    assert qk_hf.apply(model) is model
    counts = model._qwen3moe_kernels_patch_counts
    # 2 MoE blocks, 2 attentions, 2 layers, RMSNorms: 2 per layer + 2 (q/k) per attention + the final norm
    assert counts == {"Qwen3MoeSparseMoeBlock": 2, "Qwen3MoeRMSNorm": 9, "Qwen3MoeAttention": 2,
                      "Qwen3MoeDecoderLayer": 2}
    # patched in place: the very same Parameter objects, so optimizers and state_dict keep working
    assert all(p is params_before[n] for n, p in model.named_parameters())

    got, got_grads = forward_backward(model, ids, labels)
    assert_same_outputs(ref, got)
    assert set(got_grads) == set(ref_grads) == set(params_before)  # every parameter gets a gradient
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)
    import qwen3moe_kernels

    ran = qwen3moe_kernels.implementations()
    for op in ("sparse_moe_block", "rms_norm", "qk_norm_rope", "fused_add_rms_norm"):
        assert op in ran, f"{op} did not run through the fused backend: {ran}"


def test_patched_model_is_not_the_class():
    """Only the patched instance changes: another model in the same process still runs transformers' code."""
    a = qk_hf.apply(tiny_model())
    b = tiny_model()
    assert qk_hf.is_patched(a) and not qk_hf.is_patched(b)
    assert "forward" not in b.model.layers[0].mlp.__dict__
    qk_hf.revert(a)
    assert not qk_hf.is_patched(a)
    assert "forward" not in a.model.layers[0].mlp.__dict__


def test_same_greedy_tokens_with_cache():
    model = tiny_model()
    ids, _ = batch(B=1, S=7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    got = qk_hf.apply(copy.deepcopy(model)).generate(ids, **kw)
    assert torch.equal(got, ref)


def test_padding_mask_and_position_ids():
    """Left padding (attention_mask) with explicit position_ids per row: cos/sin are [B, S, D], not [1, S, D]."""
    model = tiny_model()
    ids, _ = batch(B=2, S=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        got = qk_hf.apply(model)(input_ids=ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(got.logits, ref.logits, **tol("gemm", torch.float32))


def test_bf16_model():
    model = tiny_model(torch.bfloat16)
    ids, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
        got = qk_hf.apply(model)(input_ids=ids, labels=labels)
    # bf16 through 2 layers: a few bf16 ulps of the logits (|logits| ~ 5), and the loss to 2 ulps
    torch.testing.assert_close(got.logits.float(), ref.logits.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(got.loss.float(), ref.loss.float(), **tol("gemm", torch.bfloat16))


def test_registered_experts_implementation_from_pretrained(tmp_path):
    name = qk_hf.register()
    assert name == "qwen3moe_kernels"
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert name in ALL_EXPERTS_FUNCTIONS
    model = tiny_model()
    model.save_pretrained(tmp_path)
    ids, labels = batch()
    ref, ref_grads = forward_backward(model, ids, labels)

    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path, experts_implementation=name, attn_implementation="eager")
    assert ours.config._experts_implementation == name
    got, got_grads = forward_backward(ours, ids, labels)
    assert_same_outputs(ref, got)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)
    import qwen3moe_kernels

    assert "moe_experts" in qwen3moe_kernels.implementations() or any(
        "experts" in k for k in qwen3moe_kernels.implementations())


def test_sparse_moe_block_from_hf_shares_parameters():
    model = tiny_model()
    block = model.model.layers[1].mlp
    ours = qk_hf.SparseMoeBlock.from_hf(block, return_router_logits=True)
    assert ours.router_weight is block.gate.weight
    assert ours.w_gate_up is block.experts.gate_up_proj and ours.w_down is block.experts.down_proj
    x = torch.randn(3, 5, 64, requires_grad=True)
    ref = block(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)]
    ref_xgrad = x.grad.clone()
    block.zero_grad()
    x.grad = None
    out, logits = ours(x)
    assert logits.shape == (15, 8)
    torch.testing.assert_close(out, ref, **tol("gemm", torch.float32))
    out.square().sum().backward()
    for p, g in zip((block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj), ref_grads):
        torch.testing.assert_close(p.grad, g, **tol("gemm", torch.float32))
    torch.testing.assert_close(x.grad, ref_xgrad, **tol("gemm", torch.float32))


def test_refuses_models_that_are_not_qwen3_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    other = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
                                               moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               num_experts=4, num_experts_per_tok=2))
    with pytest.raises(TypeError, match="Qwen3-MoE.*Qwen2MoeForCausalLM.*qwen2_moe"):
        qk_hf.apply(other)
    with pytest.raises(TypeError, match="Qwen3-MoE"):
        qk_hf.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Qwen3MoeSparseMoeBlock"):
        qk_hf.SparseMoeBlock.from_hf(other.model.layers[0].mlp)
    assert not qk_hf.is_patched(other)


def test_refuses_unsupported_activation():
    model = tiny_model(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        qk_hf.apply(model)


def test_experts_forward_refuses_other_layouts():
    model = tiny_model()
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    with pytest.raises(NotImplementedError, match="biases"):
        qk_hf.experts_forward(experts, torch.randn(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))


def test_training_with_gradient_checkpointing():
    """The patched forwards also run under transformers' gradient checkpointing (recomputed in backward)."""
    model = tiny_model()
    model.train()
    ids, labels = batch()
    ref, ref_grads = forward_backward(model, ids, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qk_hf.apply(model)
    got, got_grads = forward_backward(model, ids, labels)
    torch.testing.assert_close(got.loss, ref.loss, **tol("gemm", torch.float32))
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)
