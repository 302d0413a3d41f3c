"""Advantage estimators: a step's RolloutBatch → per-token advantages [samples, tokens]; `stage.rl.advantage`
picks one (checked at start-up).

Group estimators (grpo, dr_grpo, rloo) turn the rewards of each prompt's group, shaped [prompts, group],
into one advantage per sample, set on the sample and spread over its completion tokens. `teacher` is
on-policy distillation's: each sampled token's teacher log p − own log p. Extend with::

    @ADVANTAGES.register("name")
    @group_estimator
    def name(rewards): ...          # [prompts, group] → same shape

or register any `fn(batch, ctx) -> Tensor` (ctx: AdvantageContext) for per-token estimators.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from core.config import TEACHER_ADVANTAGE
from core.errors import ConfigError
from core.registry import Registry

EPS = 1e-6
ADVANTAGES = Registry("advantage estimator", "stage.rl.advantage")


@dataclass
class AdvantageContext:
    """What an estimator may need beyond the batch: the models and how to score tokens with them."""

    policy: Any
    teacher: Any = None  # stage.rl.teacher's model, when set
    logprobs: Callable | None = None  # (model, batch) -> per-token log-probs [samples, tokens]


def group_estimator(fn: Callable[[torch.Tensor], torch.Tensor]):
    """A batch estimator from `fn(rewards [prompts, group]) -> advantages`, computed in float64."""

    @functools.wraps(fn)
    def estimate(batch, ctx: AdvantageContext | None = None) -> torch.Tensor:
        rewards = torch.tensor([[s.reward for s in g] for g in batch.groups])
        per_sample = _of_rewards(fn, rewards)
        for group, row in zip(batch.groups, per_sample.tolist()):
            for sample, a in zip(group, row):
                sample.advantage = a
        return per_sample.reshape(-1)[:, None].expand_as(batch.loss_mask).clone()

    estimate.of_rewards = lambda rewards: _of_rewards(fn, rewards)
    return estimate


def _of_rewards(fn, rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"advantages need rewards shaped [prompts, group ≥ 2], got {tuple(rewards.shape)}")
    return fn(rewards.double()).float()


@ADVANTAGES.register("grpo")
@group_estimator
def grpo(rewards: torch.Tensor) -> torch.Tensor:
    """(r − group mean) / group std (DeepSeekMath eq. 4; unbiased std, as TRL and verl)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + EPS)


@ADVANTAGES.register("dr_grpo")
@group_estimator
def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: no std normalisation, which otherwise up-weights near-uniform groups."""
    return rewards - rewards.mean(1, keepdim=True)


@ADVANTAGES.register("rloo")
@group_estimator
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r − mean of the other G−1 samples."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(1, keepdim=True)) * g / (g - 1)


@ADVANTAGES.register(TEACHER_ADVANTAGE)
def teacher(batch, ctx: AdvantageContext) -> torch.Tensor:
    """On-policy distillation: teacher log p − own log p of each sampled token. Its policy gradient is that
    of −KL(student‖teacher) on the student's own samples (the reverse KL). Fills the batch's old_logp (the
    student's, which the update also needs) and teacher_logp (step metrics report the KL)."""
    if ctx.teacher is None:
        raise ConfigError("stage.rl.advantage=teacher needs the teacher: set stage.rl.teacher to its run dir.")
    if batch.old_logp is None:
        batch.old_logp = ctx.logprobs(ctx.policy, batch)
    batch.teacher_logp = ctx.logprobs(ctx.teacher, batch)
    return (batch.teacher_logp - batch.old_logp) * batch.loss_mask


def compute(name: str, rewards: torch.Tensor) -> torch.Tensor:
    """Group estimator `name` on rewards [prompts, group] → advantages, same shape."""
    estimator = ADVANTAGES.get(name)
    if not hasattr(estimator, "of_rewards"):
        raise ConfigError(f"stage.rl.advantage={name!r} is not a group estimator: it needs the whole batch")
    return estimator.of_rewards(rewards)
