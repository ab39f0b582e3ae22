"""The transformers drop-in: a patched Qwen3-MoE model computes what the unpatched one computes.

A tiny random transformers ``Qwen3MoeForCausalLM`` (fp32, hidden 64, 2 layers, 8 experts, top-2, eager attention
and eager experts as the baseline) is run unpatched, then patched with ``apply`` (or with the registered experts
implementation), and compared: logits, loss (with the router aux loss), greedy tokens, and the gradients of every
parameter after one backward. The weights are scaled up from transformers' 0.02 init so the router actually
discriminates between experts and a routing difference would show.

A fused path must not silently run the reference: FallbackWarning is an error in this file (the fallback tests
catch it with ``pytest.warns``), and every op the patched model ran must name a kernel in ``implementations()``
(``recorder.fallback`` records ``"reference (...)"``).
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf  # noqa: E402

import qwen3moe_kernels  # noqa: E402
from qwen3moe_kernels.recorder import FallbackWarning  # noqa: E402
from qwen3moe_kernels.integrations import transformers as qk_hf  # noqa: E402
from qwen3moe_kernels.ops.grouped_swiglu import cpu_experts_impl  # noqa: E402
from tolerances import assert_within_twice_torch_error, tol  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::qwen3moe_kernels.recorder.FallbackWarning")

# what apply() runs with a gradient needed (the router's top-k is then PyTorch's, see the module docstring) ...
APPLIED_OPS = {"rms_norm", "qk_norm_rope", "fused_add_rms_norm", "moe_experts"}
# ... and without one, the router_topk op too
APPLIED_OPS_NO_GRAD = APPLIED_OPS | {"router_topk"}
REGISTERED_OPS = {"moe_experts", "grouped_swiglu"}


def assert_no_reference_ran(expected_ops):
    """Every op recorded since the last recorder.reset() ran a kernel, and at least ``expected_ops`` ran."""
    ran = qwen3moe_kernels.implementations()
    missing = set(expected_ops) - set(ran)
    assert not missing, f"{sorted(missing)} did not run: {ran}"
    fell_back = {op: impl for op, impl in ran.items() if impl.startswith("reference") or ".reference." in impl}
    assert not fell_back, f"ran the reference: {fell_back}"


def rel_err(a, b):
    """Relative error in the Frobenius norm, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

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
    assert counts == {"Qwen3MoeTopKRouter": 2, "Qwen3MoeExperts": 2, "Qwen3MoeRMSNorm": 9, "Qwen3MoeAttention": 2,
                      "Qwen3MoeDecoderLayer": 2}
    # patched in place: the very same Parameter objects, so optimizers and state_dict keep working
    assert all(p is params_before[n] for n, p in model.named_parameters())

    qwen3moe_kernels.recorder.reset()
    got, got_grads = forward_backward(model, ids, labels)
    assert_no_reference_ran(APPLIED_OPS)
    assert_same_outputs(ref, got)
    assert set(got_grads) == set(ref_grads) == set(params_before)  # every parameter gets a gradient
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def test_patched_model_is_not_the_class():
    """Only the patched instances change (each gets a subclass of its transformers class, and the model's config
    names our experts): another model in the same process still runs transformers' code; revert undoes it all."""
    a = qk_hf.apply(tiny_model())
    b = tiny_model()
    assert qk_hf.is_patched(a) and not qk_hf.is_patched(b)
    layer, other = a.model.layers[0], b.model.layers[0]
    assert type(layer) is not hf.Qwen3MoeDecoderLayer and isinstance(layer, hf.Qwen3MoeDecoderLayer)
    assert type(layer.mlp.gate) is not hf.Qwen3MoeTopKRouter and type(layer).__name__ == "Qwen3MoeDecoderLayer"
    assert type(other) is hf.Qwen3MoeDecoderLayer and type(other.mlp.gate) is hf.Qwen3MoeTopKRouter
    assert a.config._experts_implementation == "qwen3moe_kernels" and b.config._experts_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in a.modules())  # nothing shadows a class's forward
    qk_hf.revert(a)
    assert not qk_hf.is_patched(a) and a.config._experts_implementation == "eager"
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in a.modules())


def _hook_every_router_and_experts(model):
    """A forward pre-hook and a forward hook on each router and experts module, recording every call (module,
    kind, argument shapes, output shapes and first output). The experts' forward hook also halves their output:
    what a hook returns must reach the rest of the model."""
    calls = []

    def pre(module, args, name):
        calls.append((name, "pre", [tuple(a.shape) for a in args]))

    def post(module, args, out, name):
        outs = out if isinstance(out, tuple) else (out,)
        calls.append((name, "post", [tuple(a.shape) for a in args], [tuple(o.shape) for o in outs], outs[0].clone()))
        return out * 0.5 if isinstance(module, hf.Qwen3MoeExperts) else None

    for name, module in model.named_modules():
        if isinstance(module, (hf.Qwen3MoeTopKRouter, hf.Qwen3MoeExperts)):
            module.register_forward_pre_hook(lambda m, a, name=name: pre(m, a, name))
            module.register_forward_hook(lambda m, a, o, name=name: post(m, a, o, name))
    return calls


def test_hooks_on_router_and_experts_run_as_unpatched():
    """The patched MoE block calls its router and experts through nn.Module.__call__, as transformers does, so
    their pre-hooks and hooks (a user's, accelerate's, transformers' router_logits recorder) see the same calls,
    and a hook's return value is used."""
    ids, _ = batch()
    runs = {}
    for patched in (False, True):
        model = tiny_model()  # same seed: the same weights
        if patched:
            qk_hf.apply(model)
        calls = _hook_every_router_and_experts(model)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        runs[patched] = calls, out
    (ref_calls, ref), (got_calls, got) = runs[False], runs[True]
    assert len(ref_calls) == 8  # 2 layers x (router, experts) x (pre-hook, hook)
    assert [c[:4] for c in got_calls] == [c[:4] for c in ref_calls]  # same modules, order, shapes
    for a, b in zip(ref_calls, got_calls):
        if a[1] == "post":  # the router's logits, the experts' output (before the halving)
            torch.testing.assert_close(b[4], a[4], **tol("gemm", torch.float32), msg=a[0])
    assert_same_outputs(ref, got)  # router_logits recorded by transformers' own hooks too
    with torch.no_grad():  # the halving hook changed the model's output, in both
        plain = tiny_model()(input_ids=ids).logits
    assert not torch.allclose(plain, ref.logits, atol=1e-3)


NORMS = ("input_layernorm", "q_norm", "k_norm", "post_attention_layernorm")


def test_hooks_on_every_norm_run_as_unpatched():
    """q_norm, k_norm and post_attention_layernorm are fused into other kernels after apply(); a module with a hook
    on it is called instead (as transformers calls it), so every hook fires as often, sees the same tensors, and
    what it returns (here: q_norm's output scaled by 0.9) reaches the rest of the model. Unhooked layers stay fused."""
    ids, _ = batch()
    runs = {}
    for patched in (False, True):
        model = tiny_model()
        if patched:
            qk_hf.apply(model)
        seen = []
        layer = model.model.layers[1]  # layer 0 has no hooks: it must still run the fused ops
        for name in NORMS:
            module = layer.self_attn if name in ("q_norm", "k_norm") else layer
            getattr(module, name).register_forward_hook(
                lambda m, args, out, name=name: (seen.append((name, args[0].clone(), out.clone())),
                                                 out * 0.9 if name == "q_norm" else None)[1])
        qwen3moe_kernels.recorder.reset()
        with torch.no_grad():
            runs[patched] = model(input_ids=ids).logits, seen
        if patched:
            assert_no_reference_ran({"qk_norm_rope", "fused_add_rms_norm"})  # layer 0
    (ref, ref_seen), (got, got_seen) = runs[False], runs[True]
    assert [n for n, *_ in got_seen] == [n for n, *_ in ref_seen] == list(NORMS)
    for (name, a_in, a_out), (_, b_in, b_out) in zip(ref_seen, got_seen):
        torch.testing.assert_close(b_in, a_in, **tol("gemm", torch.float32), msg=name)
        torch.testing.assert_close(b_out, a_out, **tol("gemm", torch.float32), msg=name)
    torch.testing.assert_close(got, ref, **tol("gemm", torch.float32))


def test_accelerate_cpu_offload_runs_as_unpatched():
    """accelerate's offload keeps weights on meta until each module's pre-forward hook brings them in: a patched
    model under cpu_offload gives the stock model's logits (the hooked norms are called, not read)."""
    accelerate = pytest.importorskip("accelerate")
    ids, _ = batch()
    with torch.no_grad():
        ref = tiny_model()(input_ids=ids).logits
    model = qk_hf.apply(tiny_model())
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].self_attn.q_norm.weight.is_meta
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, **tol("gemm", torch.float32))


def test_mixed_precision_norm_falls_back_visibly():
    """bf16 activations with an fp32 RMSNorm weight (transformers accepts it and promotes the output to fp32): no
    kernel takes mixed dtypes, so the patched norm runs the reference, warns, and returns what transformers does."""
    model = qk_hf.apply(tiny_model(torch.bfloat16))
    norm = model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.float())
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        ref = hf.Qwen3MoeRMSNorm.forward(norm, x)  # transformers' own forward
        with pytest.warns(FallbackWarning, match="rms_norm"):
            got = norm(x)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert qwen3moe_kernels.implementations()["rms_norm"].startswith("reference (")


def _greedy(model, ids):
    return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)


def assert_same_greedy_tokens(got, ref, prompt_len, dtype):
    """The same greedy tokens as stock transformers, and at every step logits within the model tolerance at the
    logits' scale (the last GEMM's rounding scales with its largest outputs, not with each element: seen in bf16,
    0.019 at a logit of 0.04 with the largest at ~3). A random tiny model's logits are nearly flat, so in bf16 two
    near-tied tokens can swap under another (equally valid) summation order: a first difference is accepted only
    where the two models' logits at that step (same prefix) are within that bound and stock's own margin between
    the two tokens is below their largest difference; after it the sequences are not comparable. A wrong expert or
    weight moves logits by far more and fails here."""
    a, b = ref.sequences[0, prompt_len:], got.sequences[0, prompt_len:]
    assert a.shape == b.shape
    for step, (sr, sg) in enumerate(zip(ref.scores, got.scores)):
        sr, sg = sr[0].float(), sg[0].float()
        bound = tol("model", dtype)["atol"] * max(1.0, sr.abs().max().item())
        torch.testing.assert_close(sg, sr, atol=bound, rtol=0, msg=lambda m: f"step {step}: {m}")
        if a[step] != b[step]:
            margin, diff = (sr[a[step]] - sr[b[step]]).item(), (sg - sr).abs().max().item()
            assert margin <= diff, f"step {step}: token {b[step]} instead of {a[step]}, stock's margin {margin} " \
                                   f"exceeds the logits' largest difference {diff}"
            return


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_greedy_tokens_with_cache(dtype):
    model = tiny_model(dtype)
    ids, _ = batch(B=1, S=7)
    ref = _greedy(model, ids)
    qwen3moe_kernels.recorder.reset()
    got = _greedy(qk_hf.apply(copy.deepcopy(model)), ids)
    assert_no_reference_ran(APPLIED_OPS_NO_GRAD)
    assert_same_greedy_tokens(got, ref, ids.shape[1], dtype)


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
    assert_no_reference_ran(APPLIED_OPS_NO_GRAD)
    torch.testing.assert_close(got.logits, ref.logits, **tol("gemm", torch.float32))


@pytest.mark.parametrize("how", ["apply", "registered experts"])
def test_bf16_model_logits_loss_and_gradients(how):
    """bf16, patched vs unpatched, each measured against the same model in fp32 (same bf16-valued weights).

    Logits and gradients use the tolerance module's rule for low-precision GEMM paths (the flash-attention rule,
    ``assert_within_twice_torch_error``): the patched model's error against fp32 may be at most twice the error of
    unpatched transformers in bf16. The table's "model" row (2 bf16 ulps) does not apply here: it is for code that
    runs transformers' ops in transformers' order, while the experts' grouped GEMMs sum in another order and 2
    layers plus the lm_head carry that on (seen: 0.035 max abs on logits of scale 4, 1.8x that row; both bf16
    models are 0.061 from fp32). Gradients: per parameter, relative error in the Frobenius norm (a max-abs
    over a whole gradient is one element's rounding), patched <= 2 x unpatched + 1e-3; seen: unpatched 0.7-2.7%
    from fp32, patched at most 1.23x that, patched vs unpatched 0.6-2.4%. A dropped term or a wrong weight
    moves a gradient by O(1). The loss is a mean over 22 tokens (errors average out, unpatched is sometimes
    1e-5 from fp32 by luck), so it uses the "model" row.
    """
    model = tiny_model(torch.bfloat16)
    ids, labels = batch()
    ref32, grads32 = forward_backward(copy.deepcopy(model).float(), ids, labels)
    ref, ref_grads = forward_backward(model, ids, labels)
    if how == "apply":
        qk_hf.apply(model)
    else:
        model.set_experts_implementation(qk_hf.register())
    qwen3moe_kernels.recorder.reset()
    got, got_grads = forward_backward(model, ids, labels)
    assert_no_reference_ran(APPLIED_OPS if how == "apply" else REGISTERED_OPS)
    assert_within_twice_torch_error(got.logits, ref32.logits, ref.logits)
    torch.testing.assert_close(got.loss.float(), ref.loss.float(), **tol("model", torch.bfloat16))
    assert set(got_grads) == set(ref_grads) == set(grads32)
    for n in ref_grads:
        ours, theirs = rel_err(got_grads[n], grads32[n]), rel_err(ref_grads[n], grads32[n])
        assert ours <= 2 * theirs + 1e-3, (
            f"{n}: gradient {ours:.2%} from fp32, unpatched bf16 {theirs:.2%} "
            f"(patched vs unpatched {rel_err(got_grads[n], ref_grads[n]):.2%})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_experts_same_greedy_tokens(dtype):
    model = tiny_model(dtype)
    ids, _ = batch(B=1, S=7)
    ref = _greedy(model, ids)
    model.set_experts_implementation(qk_hf.register())
    qwen3moe_kernels.recorder.reset()
    got = _greedy(model, ids)
    assert_no_reference_ran(REGISTERED_OPS)
    assert_same_greedy_tokens(got, ref, ids.shape[1], dtype)


def test_registered_experts_implementation_from_pretrained(tmp_path):
    """register() + from_pretrained(experts_implementation=...): same logits, loss, aux loss and gradients, and
    implementations() says our experts ran on their CPU kernels (no fallback)."""
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
    qwen3moe_kernels.recorder.reset()
    got, got_grads = forward_backward(ours, ids, labels)
    assert_no_reference_ran(REGISTERED_OPS)
    assert qwen3moe_kernels.implementations()["moe_experts"] == cpu_experts_impl()
    assert_same_outputs(ref, got)
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def test_registered_experts_call_moe_experts(monkeypatch):
    """The registered experts hand ``ops.moe_experts`` transformers' own Parameters, int32 ids and fp32 weights,
    and return what it returns; gradients flow through it to the experts' Parameters and the router."""
    from qwen3moe_kernels import ops

    calls = []
    real = ops.moe_experts

    def spy_moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, activation):
        calls.append((topk_ids.dtype, topk_weights.dtype, w_gate_up, w_down, activation))
        return real(x, w_gate_up, w_down, topk_ids, topk_weights, activation)

    monkeypatch.setattr(ops, "moe_experts", spy_moe_experts)
    qk_hf.register()
    model = tiny_model()
    ids, labels = batch()
    ref, ref_grads = forward_backward(model, ids, labels)
    model.set_experts_implementation("qwen3moe_kernels")
    qwen3moe_kernels.recorder.reset()
    got, got_grads = forward_backward(model, ids, labels)
    assert_no_reference_ran(REGISTERED_OPS)
    assert len(calls) == 2  # one per MoE layer
    for (id_dtype, w_dtype, wgu, wd, act), layer in zip(calls, model.model.layers):
        assert (id_dtype, w_dtype, act) == (torch.int32, torch.float32, "silu")
        assert wgu is layer.mlp.experts.gate_up_proj and wd is layer.mlp.experts.down_proj
    assert_same_outputs(ref, got)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def test_registered_experts_fall_back_visibly_for_float64():
    """Inputs no kernel takes (fp64) run the reference, with a FallbackWarning naming the dtype."""
    qk_hf.register()
    model = tiny_model(torch.float64)
    ids, _ = batch(B=1, S=5)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.set_experts_implementation("qwen3moe_kernels")
        with pytest.warns(FallbackWarning, match="moe_experts runs the pure-PyTorch reference.*float64"):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert qwen3moe_kernels.implementations()["moe_experts"].startswith("reference (")


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
    assert_no_reference_ran({"fused_moe", "moe_experts"})
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


# hidden_act values transformers' ACT2FN takes: the four the kernels compute (under the names configs use) and two
# they do not, which run the reference with the model's own act_fn
KERNEL_ACTS = ["silu", "gelu", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "relu"]
OTHER_ACTS = ["quick_gelu", "mish"]


@pytest.mark.parametrize("how", ["apply", "registered experts"])
@pytest.mark.parametrize("act", KERNEL_ACTS + OTHER_ACTS)
def test_any_activation_same_outputs_and_gradients(act, how):
    """Whatever hidden_act a Qwen3-MoE config names (transformers' own tiny test configs use gelu), the patched
    model or the registered experts give the stock model's logits, losses and gradients; an activation the kernels
    do not compute runs the reference with a FallbackWarning and implementations() saying why, never an error."""
    model = tiny_model(hidden_act=act)
    ids, labels = batch()
    ref, ref_grads = forward_backward(model, ids, labels)
    if how == "apply":
        qk_hf.apply(model)
    else:
        model.set_experts_implementation(qk_hf.register())
    qwen3moe_kernels.recorder.reset()
    if act in KERNEL_ACTS:
        got, got_grads = forward_backward(model, ids, labels)
        assert_no_reference_ran(APPLIED_OPS if how == "apply" else REGISTERED_OPS)
    else:
        with pytest.warns(FallbackWarning, match="moe_experts runs the pure-PyTorch reference.*activations"):
            got, got_grads = forward_backward(model, ids, labels)
        assert qwen3moe_kernels.implementations()["moe_experts"].startswith("reference (")
    assert_same_outputs(ref, got)
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def test_activation_maps_to_the_kernels_name():
    for act, want in (("silu", "silu"), ("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("relu", "relu")):
        assert qk_hf.kernel_activation(tiny_model(hidden_act=act).model.layers[0].mlp.experts) == want
    experts = tiny_model(hidden_act="mish").model.layers[0].mlp.experts
    assert qk_hf.kernel_activation(experts) is experts.act_fn


def test_set_experts_implementation_after_apply_is_followed():
    """apply() selects our experts through transformers' experts interface, so a later set_experts_implementation
    picks what it names (grouped_mm here: transformers' own code runs, ours does not), and back."""
    model = tiny_model()
    ids, labels = batch()
    qk_hf.apply(model)
    model.set_experts_implementation("grouped_mm")
    qwen3moe_kernels.recorder.reset()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert "moe_experts" not in qwen3moe_kernels.implementations()
    stock = tiny_model()
    stock.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        torch.testing.assert_close(got, stock(input_ids=ids).logits, **tol("gemm", torch.float32))
    model.set_experts_implementation("qwen3moe_kernels")
    with torch.no_grad():
        model(input_ids=ids)
    assert qwen3moe_kernels.implementations()["moe_experts"] == cpu_experts_impl()
    qk_hf.revert(model)
    assert model.config._experts_implementation == "eager"  # what it had before apply()


def test_other_experts_layouts_run_transformers_own_code_visibly():
    """An experts module whose layout the kernels do not compute (a bias here) runs transformers' eager experts,
    with a FallbackWarning, rather than raising."""
    model = tiny_model()
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    x, ids, w = torch.randn(2, 64), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    with pytest.warns(FallbackWarning, match="biases: transformers' eager experts"):
        got = qk_hf.experts_forward(experts, x, ids, w)
    experts.has_bias = False
    torch.testing.assert_close(got, qk_hf.experts_forward(experts, x, ids, w), **tol("gemm", torch.float32))


def test_registered_experts_follow_the_modules_act_fn_and_gate():
    """The kernels compute what the module's own forward computes: the activation comes from its act_fn (not the
    config's name, which another model may not have or a user may have overridden), and a module with its own
    _apply_gate (other models clamp the gate) runs transformers' eager experts, visibly."""
    from transformers.activations import ACT2FN

    experts = tiny_model().model.layers[0].mlp.experts  # config: silu
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 64, generator=g), torch.rand(5, 2, generator=g)
    ids = torch.randint(0, 8, (5, 2), generator=g)
    eager = type(experts).forward.__wrapped__
    experts.act_fn = ACT2FN["gelu_pytorch_tanh"]
    assert qk_hf.kernel_activation(experts) == "gelu_tanh"
    torch.testing.assert_close(qk_hf.experts_forward(experts, x, ids, w), eager(experts, x, ids, w),
                               **tol("gemm", torch.float32))

    # MiniMax-M3-VL's experts share Qwen3's layout but clamp the gate in their own _apply_gate
    from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as mm_config
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as mm

    torch.manual_seed(0)
    other = mm.MiniMaxM3VLExperts(mm_config.MiniMaxM3VLTextConfig(hidden_size=64, num_local_experts=8,
                                                                   intermediate_size=32))
    with torch.no_grad():
        other.gate_up_proj.normal_(0, 0.3)
        other.down_proj.normal_(0, 0.3)
    with pytest.warns(FallbackWarning, match="its own _apply_gate: transformers' eager experts"):
        got = qk_hf.experts_forward(other, x, ids, w)
    torch.testing.assert_close(got, type(other).forward.__wrapped__(other, x, ids, w), rtol=0, atol=0)
    plain = qwen3moe_kernels.ops.moe_experts(x, other.gate_up_proj, other.down_proj, ids.int(), w)
    assert not torch.allclose(got, plain, atol=1e-3)  # its gate is not SiLU's: computing SiLU would show


def test_expert_parallel_sentinel_slots_contribute_nothing():
    """transformers' expert parallelism: on a rank holding experts [0, E_local), slots routed to another rank's
    experts carry the sentinel id E_local and weight 0. They contribute nothing: the output and every gradient
    (x, the local experts' weights, and the routing weights, whose sentinel entries get exactly 0) equal those of
    the same call with the sentinel slots left out."""
    from qwen3moe_kernels import reference

    model = tiny_model()
    experts = model.model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    experts._is_expert_parallel = True
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 64, generator=g)
    ids = torch.randint(0, E, (9, 3), generator=g)
    sentinel = torch.rand(9, 3, generator=g) < 0.4
    sentinel[0] = True  # a token with no local slot at all
    ids[sentinel] = E
    w = torch.rand(9, 3, generator=g).masked_fill(sentinel, 0.0)

    def run(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        out = fn(xs, ws)
        out.backward(torch.randn(9, 64, generator=torch.Generator().manual_seed(6)))
        return out.detach(), xs.grad, ws.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    def owned_only(xs, ws):  # the reference over the owned slots: each one alone, summed per token
        keep = ~sentinel
        tok, col = keep.nonzero(as_tuple=True)
        ys = reference.moe_experts(xs[tok], experts.gate_up_proj, experts.down_proj, ids[keep][:, None],
                                   ws[tok, col][:, None])
        return torch.zeros_like(xs).index_add(0, tok, ys)

    got = run(lambda xs, ws: qk_hf.experts_forward(experts, xs, ids, ws))
    want = run(owned_only)
    for name, a, b in zip(("out", "dx", "dweights", "dw_gate_up", "dw_down"), got, want):
        torch.testing.assert_close(a, b, **tol("gemm", torch.float32), msg=name)
    assert (got[2][sentinel] == 0).all() and (got[0][0] == 0).all()

    # the sentinel slots are never computed: not a single row runs on expert 0 for them
    calls = []
    real = qwen3moe_kernels.ops.moe_experts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwen3moe_kernels.ops, "moe_experts", lambda xs, *a, **kw: calls.append(xs.shape[0]) or real(
            xs, *a, **kw))
        qk_hf.experts_forward(experts, x, ids, w)
    assert calls == [int((~sentinel).sum())]
    # a non-finite token reaching only other ranks' experts cannot leak into the output through 0 * inf
    x_inf = x.clone()
    x_inf[0] = float("inf")  # token 0 has only sentinel slots
    assert torch.isfinite(qk_hf.experts_forward(experts, x_inf, ids, w)).all()


def _enable_checkpointing(model, use_reentrant):
    # transformers 5.2x calls it activation checkpointing; 5.17 gradient checkpointing
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def _count_checkpoint_calls(model):
    """Wrap each decoder layer's checkpoint function with a counter; returns the list of counts."""
    counts = []
    for layer in model.model.layers:
        fn, i = layer._gradient_checkpointing_func, len(counts)
        counts.append(0)

        def counted(*args, fn=fn, i=i, **kwargs):
            counts[i] += 1
            return fn(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    return counts


def _count_attention_runs(model):
    """Count each attention module's forward runs (a checkpointed layer runs it again in the backward)."""
    runs = []
    for layer in model.model.layers:
        runs.append(0)
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=len(runs) - 1: runs.__setitem__(i, runs[i] + 1))
    return runs


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("when", ["before apply", "after apply"])
def test_activation_checkpointing_still_checkpoints(when, use_reentrant):
    """With checkpointing enabled (before or after apply, reentrant or not) each patched decoder layer goes through
    transformers' checkpoint function as the stock one does, is recomputed in the backward (its attention runs
    twice per forward + backward), and the loss and every gradient equal the stock model's."""
    results = {}
    for patched in (False, True):
        model = tiny_model()
        model.train()
        if patched and when == "before apply":
            _enable_checkpointing(model, use_reentrant)
            qk_hf.apply(model)
        elif patched:
            qk_hf.apply(model)
            _enable_checkpointing(model, use_reentrant)
        else:
            _enable_checkpointing(model, use_reentrant)
        calls, runs = _count_checkpoint_calls(model), _count_attention_runs(model)
        ids, labels = batch()
        qwen3moe_kernels.recorder.reset()
        out, grads = forward_backward(model, ids, labels)
        if patched:
            assert_no_reference_ran(APPLIED_OPS)
        results[patched] = out, grads, calls, runs
    (ref, ref_grads, ref_calls, ref_runs), (got, got_grads, got_calls, got_runs) = results[False], results[True]
    assert ref_calls == got_calls == [1, 1], (ref_calls, got_calls)
    assert ref_runs == got_runs == [2, 2], (ref_runs, got_runs)  # forward, then the recompute in backward
    torch.testing.assert_close(got.loss, ref.loss, **tol("gemm", torch.float32))
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **tol("gemm", torch.float32), msg=n)


def saved_activation_bytes(model, ids, labels) -> int:
    """Bytes of the tensors autograd saves for the backward in one training forward (what activation
    checkpointing trades for recompute), counted with saved-tensor hooks; parameters are not activations."""
    params = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels).loss.backward()
    return total[0]


def test_checkpointing_cuts_saved_activations_as_for_the_stock_model():
    """Activation memory with and without checkpointing: it falls on the patched model as it does on the stock one
    (the numbers are printed; docs/integrations.md has them at a larger size)."""
    ids, labels = batch(B=2, S=64)
    got = {}
    for patched in (False, True):
        for ckpt in (False, True):
            model = tiny_model()
            model.train()
            if ckpt:
                _enable_checkpointing(model, use_reentrant=False)
            if patched:
                qk_hf.apply(model)
            got[patched, ckpt] = saved_activation_bytes(model, ids, labels)
    print({k: v / 2**20 for k, v in got.items()})
    for patched in (False, True):
        assert got[patched, True] < 0.5 * got[patched, False], got
    ratio = lambda p: got[p, True] / got[p, False]  # noqa: E731
    assert ratio(True) <= 1.5 * ratio(False), got  # the patched model saves no more than stock does, relatively


def test_installed_transformers_is_a_supported_version():
    """The drop-in's tests run against the transformers installed; it must be one pyproject.toml declares (CI runs
    them on the newest and the oldest)."""
    import re
    import tomllib
    from pathlib import Path

    from packaging.version import Version

    spec = next(d for d in tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
                ["optional-dependencies"]["test"] if d.startswith("transformers"))
    lo, hi = re.search(r">=\s*([\d.]+),\s*<\s*([\d.]+)", spec).groups()
    assert Version(lo) <= Version(transformers.__version__) < Version(hi), (transformers.__version__, spec)
