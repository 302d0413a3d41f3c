"""Configs, the model as megatron-core specs, data and tokenizers. Knows nothing of parallelism."""
