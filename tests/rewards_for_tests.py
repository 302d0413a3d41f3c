"""Rewards for tests/test_rewards.py, in an importable module so the pool's workers can import them too."""

from __future__ import annotations

import os
import time

from rlhf.rewards import REWARDS
from rlhf.tasks import TASKS, Task


@REWARDS.register("test_sleep")
def sleep_reward(completion: str, sample: dict) -> float:
    """Sleeps metadata.sleep_s seconds (a hung verifier), then scores 1."""
    time.sleep(sample["metadata"].get("sleep_s", 0.0))
    return 1.0


@REWARDS.register("test_raise")
def raise_reward(completion: str, sample: dict) -> float:
    if sample["metadata"].get("raise"):
        raise RuntimeError("boom from test_raise")
    return 1.0


@REWARDS.register("test_length")
def length_reward(completion: str, sample: dict) -> float:
    return float(len(completion))


@REWARDS.register("test_exit")
def exit_reward(completion: str, sample: dict) -> float:
    """Kills its process (a verifier that segfaults) when metadata.exit is set."""
    if sample["metadata"].get("exit"):
        os._exit(3)
    return 1.0


# A task registered outside rlhf/tasks: the pool's workers must import this module to score it.
TASKS.register("test_upper", Task("test_upper", score=lambda answer, row: float(answer == row["answer"].upper())))
