"""pytest-benchmark suite of the model-level benchmark (``qwen3moe_kernels.bench.model``): prefill (256 tokens)
and decode (16 new tokens) of the scaled-down Qwen3-30B-A3B, per variant. The table with tokens/s and ratios is
``python -m qwen3moe_kernels.bench.model`` or ``qwen3moe-kernels bench --ops model``."""

import pytest
import torch

from qwen3moe_kernels.bench import model as b
from qwen3moe_kernels.bench.machine import bench_device, bench_dtype


@pytest.fixture(scope="module")
def scaled_models():
    """transformers' scaled-down model and the thin model on the same weights (built once per module)."""
    hf = b.build_transformers_model(2, bench_dtype(), bench_device())
    thin, why = b.thin_model(hf, bench_dtype(), bench_device())
    return hf, thin, why


@pytest.mark.parametrize("variant", b.VARIANTS)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_model(benchmark, scaled_models, variant, phase):
    hf, thin, why = scaled_models
    p = torch.randint(0, hf.config.vocab_size, (1, 256 if phase == "prefill" else 32), device=hf.device)
    if variant.startswith("qwen3moe_kernels-"):
        if thin is None:
            pytest.fail(f"thin model not built: {why}")
        thin.set_backend(variant.split("-", 1)[1])
        forward = lambda: thin(p)  # noqa: E731
        generate = lambda: thin.generate(p, max_new_tokens=16)  # noqa: E731
    else:
        b.set_variant(hf, variant)
        forward = lambda: hf(input_ids=p, logits_to_keep=1)  # noqa: E731
        generate = lambda: hf.generate(p, max_new_tokens=16, min_new_tokens=16, do_sample=False,  # noqa: E731
                                       pad_token_id=0)
    with torch.inference_mode():
        benchmark.group = f"model {phase}"
        benchmark.extra_info.update(variant=variant, phase=phase)
        benchmark.pedantic(forward if phase == "prefill" else generate, rounds=3, warmup_rounds=1, iterations=1)
    b.set_variant(hf, "transformers")
