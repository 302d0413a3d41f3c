"""Rollout engines: one interface (`inference.engine.Engine`), a registry, vLLM by default, HF as reference."""
