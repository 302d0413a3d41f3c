"""Advantage estimators: per-sample rewards of one step, shaped [prompts, group] → advantages, same shape.

Extend with `@register_adv_est("name")`; `stage.rl.advantage=name` picks it.
"""

from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-6
ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_adv_est(name: str):
    def add(fn):
        ADVANTAGES[name] = fn
        return fn

    return add


@register_adv_est("grpo")
def grpo(rewards: torch.Tensor) -> torch.Tensor:
    """(r − group mean) / group std (DeepSeekMath eq. 4; unbiased std, as TRL and verl)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + EPS)


@register_adv_est("dr_grpo")
def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: no std normalisation, which otherwise up-weights near-uniform groups."""
    return rewards - rewards.mean(1, keepdim=True)


@register_adv_est("rloo")
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r − mean of the other G−1 samples."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(1, keepdim=True)) * g / (g - 1)


def compute(name: str, rewards: torch.Tensor) -> torch.Tensor:
    if name not in ADVANTAGES:
        raise KeyError(f"stage.rl.advantage={name!r}: expected one of {sorted(ADVANTAGES)}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"advantages need rewards shaped [prompts, group ≥ 2], got {tuple(rewards.shape)}")
    return ADVANTAGES[name](rewards.double()).float()
