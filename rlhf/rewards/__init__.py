"""Rule rewards for GRPO: a registry of reward functions, and a pool that scores rollouts with them.
Accuracy asks the sample's task (rlhf.tasks) for its scorer.

A reward is ``fn(completion, sample) -> float``. ``completion`` is the generated text after the prompt;
the prompt templates end with the opening ``<think>``, so the response is ``"<think>" + completion``.
``sample`` is a prompt row (``prompt``, ``answer``, ``task``, ``metadata``; see rlhf.prompts).

Adding one::

    @REWARDS.register("length_penalty")
    def length_penalty(completion: str, sample: dict) -> float: ...

then give it a weight (``+reward.weights.length_penalty=-0.1``: a new key needs the ``+``). RewardPool runs rewards in worker
processes, which import the module each reward was defined in: define rewards in an importable
module, not in a notebook cell.

Importing this package must stay light (no torch): every reward worker imports it.
"""

from __future__ import annotations

from typing import Callable

from core.registry import Registry

RewardFn = Callable[[str, dict], float]
REWARDS: Registry[RewardFn] = Registry("reward", "reward.weights")


# Imported after the registry exists: rules registers the built-in rewards through it.
from rlhf.rewards import language  # noqa: E402, F401  (registers "language_consistency")
from rlhf.rewards.pool import RewardPool, RewardResult  # noqa: E402
from rlhf.rewards.rules import extract_answer  # noqa: E402  (registers format and accuracy)

__all__ = [
    "REWARDS",
    "RewardFn",
    "RewardPool",
    "RewardResult",
    "extract_answer",
]
