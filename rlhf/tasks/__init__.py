"""Verifiable tasks: prompts, reference reasoning, generated pretraining text and scorers."""
