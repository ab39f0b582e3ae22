"""The thin Qwen3-MoE model: config, modeling (eager/fused backends) and the checkpoint loader."""

from .config import Qwen3MoeConfig
from .modeling import CausalLMOutput, KVCache, Qwen3MoeForCausalLM

__all__ = ["Qwen3MoeConfig", "Qwen3MoeForCausalLM", "KVCache", "CausalLMOutput"]
