"""The stage table: every stage by its stage.name, the module whose ``run(cfg)`` runs it, and its loop.

The GRPO stages (R1-Zero, R1 stages 2 and 4, on-policy distillation) share rlhf.r1_zero's loop and differ
in configuration; sft and distill share the supervised loop. Layout validation (core.config) and the
planner (tools.plan) ask ``RL_STAGES``, the launcher (rlhf.train) ``STAGES``. Light: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.registry import Registry


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # holds run(cfg)
    loop: str  # supervised | grpo | sampling


STAGES: Registry[Stage] = Registry("stage", "stage.name")
for _stage in (
    Stage("pretrain", "rlhf.pretrain", "supervised"),
    Stage("sft", "rlhf.sft", "supervised"),
    Stage("cold_start_sft", "rlhf.cold_start", "supervised"),
    Stage("distill", "rlhf.sft", "supervised"),
    Stage("reward_model", "rlhf.reward_model", "supervised"),
    Stage("r1_zero", "rlhf.r1_zero", "grpo"),
    Stage("reasoning_rl", "rlhf.r1_zero", "grpo"),
    Stage("general_rl", "rlhf.r1_zero", "grpo"),
    Stage("on_policy_distill", "rlhf.r1_zero", "grpo"),
    Stage("rejection_sampling", "rlhf.rejection_sampling", "sampling"),
):
    STAGES.register(_stage.name, _stage)

RL_STAGES = tuple(name for name, stage in STAGES.items() if stage.loop == "grpo")
