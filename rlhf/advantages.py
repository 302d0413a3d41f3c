"""Advantage estimators: per-sample rewards of one step, shaped [prompts, group] → advantages, same shape.

Extend with `@ADVANTAGES.register("name")`; `stage.rl.advantage=name` picks it (checked at start-up).
"""

from __future__ import annotations

import torch

from core.registry import Registry

EPS = 1e-6
ADVANTAGES = Registry("advantage estimator", "stage.rl.advantage")


@ADVANTAGES.register("grpo")
def grpo(rewards: torch.Tensor) -> torch.Tensor:
    """(r − group mean) / group std (DeepSeekMath eq. 4; unbiased std, as TRL and verl)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + EPS)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: no std normalisation, which otherwise up-weights near-uniform groups."""
    return rewards - rewards.mean(1, keepdim=True)


@ADVANTAGES.register("rloo")
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r − mean of the other G−1 samples."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(1, keepdim=True)) * g / (g - 1)


def compute(name: str, rewards: torch.Tensor) -> torch.Tensor:
    estimator = ADVANTAGES.get(name)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"advantages need rewards shaped [prompts, group ≥ 2], got {tuple(rewards.shape)}")
    return estimator(rewards.double()).float()
