"""Shared by the expert-parallel test modules: the checkpoints (written once per session) and the results of one
spawned gloo group per world size (``parallel_cases.run_all``), so each module's tests read one run."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

from parallel_harness import results_or_raise

WORLDS = (2, 4)


@functools.lru_cache(maxsize=None)
def checkpoints() -> tuple[str, str, str]:
    """(small per-expert dir, the same model as one fused-layout file, a bigger per-expert dir for the RSS
    measurement: 8 experts of 3 x 256 x 512 fp32 in 4 layers, ~50 MB of experts, ~92% of the weights)."""
    from model_fixtures import hf_model, save_fused, save_per_expert

    root = tempfile.mkdtemp(prefix="qwen3moe_ep_ckpt_")
    atexit.register(shutil.rmtree, root, True)
    small = hf_model(num_experts=8, num_experts_per_tok=2)
    save_per_expert(small, os.path.join(root, "small"))
    save_fused(small, os.path.join(root, "small_fused"))
    big = hf_model(num_experts=8, num_experts_per_tok=2, hidden_size=256, moe_intermediate_size=512,
                   intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64)
    save_per_expert(big, os.path.join(root, "big"))
    return os.path.join(root, "small"), os.path.join(root, "small_fused"), os.path.join(root, "big")


def ep_results(world: int) -> list[dict]:
    """Every rank's ``run_all`` result for a group of ``world`` (1: the RSS measurement only)."""
    small, fused, big = checkpoints()
    return results_or_raise(world, "parallel_cases:run_all", small, fused, big)


def case_failures(world: int, name: str) -> list[str]:
    return [r["cases"][name] for r in ep_results(world) if r["cases"].get(name, "missing") is not None]
