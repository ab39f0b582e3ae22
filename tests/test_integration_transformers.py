"""The transformers drop-in: a patched Qwen3-MoE model computes what the unpatched one computes.

A tiny random transformers ``Qwen3MoeForCausalLM`` (fp32, hidden 64, 2 layers, 8 experts, top-2, eager attention
and eager experts as the baseline) is run unpatched, then patched with ``apply`` (or with the registered experts
implementation), and compared: logits, loss (with the router aux loss), greedy tokens, and the gradients of every
parameter after one backward. The weights are scaled up from transformers' 0.02 init so the router actually
discriminates between experts and a routing difference would show.
"""

import copy
import warnings

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


@pytest.mark.parametrize("how", ["apply", "registered experts"])
def test_bf16_model(how):
    model = tiny_model(torch.bfloat16)
    ids, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
        if how == "apply":
            qk_hf.apply(model)
        else:
            model.set_experts_implementation(qk_hf.register())
        got = model(input_ids=ids, labels=labels)
    # bf16 through 2 layers: a few bf16 ulps of the logits (|logits| ~ 5), and the loss to 2 ulps
    torch.testing.assert_close(got.logits.float(), ref.logits.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(got.loss.float(), ref.loss.float(), **tol("gemm", torch.bfloat16))


def test_registered_experts_same_greedy_tokens():
    model = tiny_model()
    ids, _ = batch(B=1, S=7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    model.set_experts_implementation(qk_hf.register())
    assert torch.equal(model.generate(ids, **kw), ref)


def test_registered_experts_implementation_from_pretrained(tmp_path):
    """register() + from_pretrained(experts_implementation=...): same logits, loss, aux loss and gradients, and
    implementations() names the experts function that ran (the fused entry point, or a visible fallback)."""
    import qwen3moe_kernels
    from qwen3moe_kernels.dispatch import FallbackWarning

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
    entry = qk_hf.experts_entry_point()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_grads = forward_backward(ours, ids, labels)
    experts_fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning) and "moe_experts" in str(w.message)]
    assert_same_outputs(ref, got)
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)

    ran = qwen3moe_kernels.implementations()
    if entry is None:  # no experts entry point yet: the reference ran, and said so
        assert ran["experts_implementation"] == "qwen3moe_kernels.reference.moe_experts"
        assert ran["moe_experts"].startswith("reference (") and experts_fallbacks
    else:
        assert ran["experts_implementation"] == entry[1], ran
        assert not experts_fallbacks, [str(w.message) for w in experts_fallbacks]


def test_registered_experts_call_the_entry_point(monkeypatch):
    """The registered experts hand the entry point transformers' own Parameters, int32 ids and fp32 weights, and
    return what it returns; gradients flow through it to the experts' Parameters and the router."""
    import qwen3moe_kernels
    from qwen3moe_kernels import fused, reference

    calls = []

    def fake_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down):
        calls.append((topk_ids.dtype, topk_weights.dtype, w_gate_up, w_down))
        return reference.moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down)

    monkeypatch.setattr(fused, "moe_experts", fake_moe_experts, raising=False)
    qk_hf.register()
    model = tiny_model()
    ids, labels = batch()
    ref, ref_grads = forward_backward(model, ids, labels)
    model.set_experts_implementation("qwen3moe_kernels")
    got, got_grads = forward_backward(model, ids, labels)
    assert len(calls) == 2  # one per MoE layer
    for (id_dtype, w_dtype, wgu, wd), layer in zip(calls, model.model.layers):
        assert (id_dtype, w_dtype) == (torch.int32, torch.float32)
        assert wgu is layer.mlp.experts.gate_up_proj and wd is layer.mlp.experts.down_proj
    assert qwen3moe_kernels.implementations()["experts_implementation"] == "qwen3moe_kernels.fused.moe_experts"
    assert_same_outputs(ref, got)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def test_registered_experts_fall_back_visibly_for_float64():
    """Inputs no kernel takes (fp64) run the reference, with a FallbackWarning naming the dtype."""
    import qwen3moe_kernels
    from qwen3moe_kernels.dispatch import FallbackWarning

    qk_hf.register()
    model = tiny_model(torch.float64)
    ids, _ = batch(B=1, S=5)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.set_experts_implementation("qwen3moe_kernels")
        why = "float64" if qk_hf.experts_entry_point() is not None else "no fused experts entry point"
        with pytest.warns(FallbackWarning, match=why):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    ran = qwen3moe_kernels.implementations()
    assert ran["experts_implementation"] == "qwen3moe_kernels.reference.moe_experts"
    assert ran["moe_experts"].startswith("reference (")


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
