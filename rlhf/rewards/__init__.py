"""Rule rewards for GRPO: a registry of reward functions, and a pool that scores rollouts with them.

A reward is ``fn(completion, sample) -> float``. ``completion`` is the generated text after the prompt;
the prompt templates end with the opening ``<think>``, so the response is ``"<think>" + completion``.
``sample`` is a prompt row (``prompt``, ``answer``, ``task``, ``metadata``; see rlhf.prompts).

Adding one::

    @register_reward("length_penalty")
    def length_penalty(completion: str, sample: dict) -> float: ...

then give it a weight (``reward.weights.length_penalty=-0.1``). RewardPool runs rewards in worker
processes, which import the module each reward was defined in: define rewards in an importable
module, not in a notebook cell.

Importing this package must stay light (no torch): every reward worker imports it.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[[str, dict], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        # The same function seen again is a module imported under a second name (a test module as
        # `tests.x` and `x`, a script as `__main__` and `__mp_main__`): keep the latest.
        if old is not None and old.__qualname__ != fn.__qualname__:
            raise ValueError(
                f"reward {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
                f"pick another name for {fn.__module__}.{fn.__qualname__}"
            )
        REWARDS[name] = fn
        return fn

    return add


# Imported after the registry exists: rules registers the built-in rewards through it.
from rlhf.rewards import coding, language  # noqa: E402, F401  (register "code" and "language_consistency")
from rlhf.rewards.pool import RewardPool, RewardResult  # noqa: E402
from rlhf.rewards.rules import SCORERS, extract_answer, register_scorer, validate_gold  # noqa: E402

__all__ = [
    "REWARDS",
    "RewardFn",
    "RewardPool",
    "RewardResult",
    "SCORERS",
    "extract_answer",
    "register_reward",
    "register_scorer",
    "validate_gold",
]
