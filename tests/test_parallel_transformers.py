"""transformers' own expert parallelism end to end on CPU with gloo, at world size 2, against the unsharded model,
with transformers' experts and with ours registered (and the thin model under our EP on the same batch).
transformers' distributed from_pretrained needs ``accelerate`` (in the ``test`` extra)."""

from __future__ import annotations

import os

import pytest

from parallel_harness import run_group
from qwen3moe_kernels.ops.grouped_swiglu import cpu_experts_impl


@pytest.mark.slow
def test_transformers_expert_parallel_end_to_end(tmp_path):
    from model_fixtures import hf_model

    hf_model(num_experts=8, num_experts_per_tok=2).save_pretrained(tmp_path)
    results = run_group(2, "parallel_transformers_cases:run", os.fspath(tmp_path))
    for rank, res in enumerate(results):
        for name, r in res.items():
            assert r["local_experts"] == 4, (rank, name, r)  # 8 experts over 2 ranks
            assert r["max_diff"] <= 1e-5, (rank, name, r)
            assert r["max_diff_ours"] is None or r["max_diff_ours"] <= 1e-5, (rank, name, r)
            # our registered experts really ran (on their CPU kernels), transformers' did not record anything
            want = cpu_experts_impl() if name.endswith("qwen3moe_kernels") else None  # e.g. "cpu (avx512_bf16)"
            assert r["moe_experts"] == want, (rank, name, r)
