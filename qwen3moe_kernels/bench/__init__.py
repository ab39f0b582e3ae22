"""Benchmarks of the ops against the reference and transformers, and the harness they share.

Harness: ``machine`` (what the numbers were measured on, dtype and device selection), ``timing`` (medians with
spread), ``checks`` (results checked before timing), ``report`` (tables, ratios, JSON, plots). One module per
benchmark, each with ``run(device, token_counts, dtype=None, ...) -> list[dict]`` (one row per op, implementation
and token count): ``fused_moe``, ``router_topk``, ``moe_permute``, ``rms_norm``, ``rope``, ``model``.
``qwen3moe-kernels bench`` runs them; ``benchmarks/bench_<stem>.py`` are their pytest-benchmark suites;
``benchmarks/README.md`` says what each measures and how.
"""

