"""The thin model under expert parallelism on CPU with gloo: ``from_pretrained(..., ep_group=)`` loads only this
rank's experts (the tensors read, and the peak RSS of the load at world sizes 1, 2 and 4), and forward/generate
with each rank on its own batch match the single-process model. The cases run in the same spawned groups as
``test_parallel.py``'s (``parallel_cases.py``)."""

from __future__ import annotations

import pytest

import parallel_cases as pc
from parallel_fixtures import WORLDS, case_failures, ep_results

MODEL_CASES = [pytest.param(w, name, id=f"world{w}-{name}", marks=[pytest.mark.slow] if w > 2 else [])
               for w in WORLDS for name in pc.MODEL_CASES]


@pytest.mark.parametrize("world,name", MODEL_CASES)
def test_ep_model_case(world, name):
    failures = case_failures(world, name)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_ep_load_peak_rss_falls_by_the_experts_share():
    """Peak RSS growth of loading a ~54 MB fp32 checkpoint whose experts are 50 MB (~92%): each rank of w holds
    1/w of them, and touches only their pages of the file. Not reading the others saves twice their share
    (parameters and mapped file pages); reading them all and keeping a slice would save only once, so the
    reduction must be at least 1.5x the parameter share."""
    growth = {w: max(r["rss"]["load_peak_growth_kib"] for r in ep_results(w)) * 1024 for w in (1,) + WORLDS}
    experts = ep_results(1)[0]["rss"]["local_expert_bytes"]
    report = ", ".join(f"world {w}: {g / 2**20:.1f} MiB" for w, g in growth.items())
    for w in WORLDS:
        share = (1 - 1 / w) * experts
        assert growth[1] - growth[w] >= 1.5 * share, f"{report}; experts {experts / 2**20:.1f} MiB"
