"""Parity of the thin model with transformers' Qwen3MoeForCausalLM on tiny random fp32 configs.

Each config is saved with save_pretrained (per-expert experts, one file or sharded), in the released per-expert
layout, or as ``hf.state_dict()`` itself (transformers' fused 3-D experts), and loaded with our from_pretrained;
logits, loss, aux loss and router logits must agree to the "model" tolerance and greedy generation token for
token (left-padded batches too). Also: bf16 loading (aux loss bit for bit from transformers' router logits), the
fused backend against eager and what it reports, and the KV cache against a full recompute.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from model_fixtures import hf_model, save_fused, save_per_expert
from safetensors import safe_open
from tolerances import tol

import qwen3moe_kernels
from qwen3moe_kernels import recorder, reference
from qwen3moe_kernels.model import Qwen3MoeForCausalLM
from qwen3moe_kernels.ops.grouped_swiglu import cpu_experts_impl

CONFIGS = {
    "base": dict(),
    "top1_no_renorm_E8": dict(num_experts=8, num_experts_per_tok=1, norm_topk_prob=False),
    "top8_E8_mlp_only": dict(num_experts=8, num_experts_per_tok=8, num_hidden_layers=3, mlp_only_layers=[1]),
    "step2_tied_E10": dict(num_experts=10, num_experts_per_tok=3, num_hidden_layers=4, decoder_sparse_step=2,
                           tie_word_embeddings=True),
    "E60_headdim": dict(num_experts=60, num_experts_per_tok=8, head_dim=32, norm_topk_prob=False),
}


def _save(hf, path, layout):
    if layout == "fused":
        save_fused(hf, path)
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
        for kind in ("gate_up_proj", "down_proj"):
            assert any(n.endswith(f".mlp.experts.{kind}") for n in names), names
        assert not any(".experts.0." in n for n in names)
    elif layout == "sharded":
        hf.save_pretrained(path, max_shard_size="40KB")
        assert (path / "model.safetensors.index.json").exists()
    else:
        save_per_expert(hf, path)


def _compare(hf, ours, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = hf.config.vocab_size
    ids = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding: masked out of the aux loss
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    t = tol("model", torch.float32)
    torch.testing.assert_close(out.logits, ref.logits, **t)
    torch.testing.assert_close(out.loss, ref.loss, **t)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **t)
    assert len(out.router_logits) == len(ref.router_logits)
    for a, b in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, **t)
    prompt = ids[:, :5]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=6)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path):
    hf = hf_model(seed=list(CONFIGS).index(name), **CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    n_sparse = sum(ours.config.is_sparse(i) for i in range(ours.config.num_hidden_layers))
    assert n_sparse == len([m for m in hf.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"])
    _compare(hf, ours)


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_parity_any_activation_the_kernels_compute(act, backend, tmp_path):
    """A config naming another activation (transformers' tiny test configs use gelu) loads and matches transformers,
    on the reference and on the kernels (experts and the dense MLP of an mlp_only layer)."""
    hf = hf_model(seed=6, hidden_act=act, **CONFIGS["top8_E8_mlp_only"])
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path, backend=backend)
    assert ours.config.hidden_act == act
    _compare(hf, ours)


@pytest.mark.parametrize("layout", ["fused", "sharded", "per_expert"])
@pytest.mark.parametrize("name", ["base", "step2_tied_E10"])
def test_parity_checkpoint_layouts(name, layout, tmp_path):
    hf = hf_model(seed=3, **CONFIGS[name])
    _save(hf, tmp_path, layout)
    if layout == "sharded":
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _compare(hf, Qwen3MoeForCausalLM.from_pretrained(tmp_path))


def test_kv_cache_matches_full_recompute(tmp_path):
    hf = hf_model(seed=4, **CONFIGS["top8_E8_mlp_only"])
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :6], use_cache=True)
        second = ours(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert second.past_key_values.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, **tol("model", torch.float32))


def test_bf16_load_matches_transformers_bf16(tmp_path):
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_router_logits=True)
        out = ours(ids, attention_mask=mask, output_router_logits=True)
    t = tol("model", torch.bfloat16)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, ref.logits, **t)
    assert len(out.router_logits) == len(ref.router_logits)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, **t)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **t)
    # The aux loss itself is transformers' bit for bit: softmax in bf16 (no fp32 upcast), fp32 sums. The model's
    # bf16 attention rounds differently from transformers' (other matmul layouts), hence the tolerance above.
    cfg = ours.config
    again = reference.load_balancing_loss(ref.router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask)
    assert torch.equal(again, ref.aux_loss), (again, ref.aux_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_is_transformers_bit_for_bit(dtype, masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(11)
    logits = tuple((3 * torch.randn(2 * 37, 16, generator=g)).to(dtype) for _ in range(3))
    mask = (torch.rand(2, 37, generator=g) > 0.2).long() if masked else None
    got = reference.load_balancing_loss(logits, 16, 4, mask)
    assert torch.equal(got, load_balancing_loss_func(logits, 16, 4, mask))


def test_left_padded_batched_generate_matches_transformers(tmp_path):
    hf = hf_model(seed=8, **CONFIGS["top8_E8_mlp_only"])
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(2)
    S, n = 7, 8
    mask = torch.ones(3, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding of different lengths; row 2 has none
    mask[1, :1] = 0
    ids = torch.randint(1, hf.config.vocab_size, (3, S), generator=g).masked_fill(mask == 0, 0)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=n, attention_mask=mask)
    assert torch.equal(got, want), (got, want)
    # Padding changes nothing: row 0 alone, unpadded, decodes the same tokens.
    assert torch.equal(ours.generate(ids[:1, 3:], max_new_tokens=n), got[:1, 3:])
    # An eos that row 0 reaches mid-way: its later tokens are pad_token_id, as transformers fills them.
    eos = int(want[0, S + 2])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                       pad_token_id=5)
    got = ours.generate(ids, max_new_tokens=n, attention_mask=mask, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(got, want), (got, want)
    assert (got[0, S + 3:] == 5).all()


def test_generate_argument_errors(tmp_path):
    hf_model(seed=9).save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path)
    ids = torch.zeros(2, 3, dtype=torch.long)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0 when do_sample=True"):
            ours.generate(ids, 2, do_sample=True, temperature=temperature)
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, vocab_size=96\), got 96"):
        ours.generate(ids, 2, eos_token_id=1, pad_token_id=96)
    with pytest.raises(ValueError, match="attention_mask must be a tensor shaped like input_ids"):
        ours.generate(ids, 2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        ours(ids, position_ids=torch.zeros(2, 4, dtype=torch.long))


def test_fused_backend_matches_eager_and_reports_paths(tmp_path):
    hf = hf_model(seed=6, **CONFIGS["top8_E8_mlp_only"])
    hf.save_pretrained(tmp_path)
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path, backend="fused")
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    recorder.reset()
    with torch.no_grad(), warnings.catch_warnings():
        # on CPU every fused op has a kernel: a fallback here is a failure, not a warning to ignore
        warnings.simplefilter("error", qwen3moe_kernels.FallbackWarning)
        fused = ours(ids, output_router_logits=True)
        impls = qwen3moe_kernels.implementations()
        eager = ours.set_backend("eager")(ids, output_router_logits=True)
    for op in ("rms_norm", "fused_add_rms_norm", "qk_norm_rope", "router_topk"):
        assert impls.get(op) == "cpu", (op, impls)
    for op in ("fused_moe", "grouped_swiglu"):  # the block names its experts' path: "cpu (<ISA path>)"
        assert impls.get(op) == cpu_experts_impl(), (op, impls)
    # attention and the dense MLP (layer 1 is in mlp_only_layers) are torch code: reported as such, not hidden
    assert impls["attention"] == "torch (scaled_dot_product_attention)", impls
    assert impls["mlp"] == "torch (F.linear gated MLP)", impls
    torch.testing.assert_close(fused.logits, eager.logits, **tol("model", torch.float32))
    torch.testing.assert_close(fused.aux_loss, eager.aux_loss, **tol("model", torch.float32))
    with pytest.raises(ValueError, match="backend"):
        ours.set_backend("cuda-graphs")
