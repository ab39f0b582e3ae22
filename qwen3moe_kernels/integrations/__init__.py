"""Drop-ins for other libraries. ``qwen3moe_kernels.integrations.transformers`` patches Hugging Face transformers'
Qwen3-MoE models (imported on demand: transformers is an optional dependency)."""
