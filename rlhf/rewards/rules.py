"""The R1-Zero rule rewards: format (tags in order) and accuracy (the answer against the gold, by the
sample's task: its ``score`` in rlhf.tasks.TASKS takes the final answer and the sample).

Two answer conventions (``reward.answer``, stamped on each prompt row as metadata["answer_style"]):
``tag``, R1-Zero's ``<think>…</think><answer>…</answer>``, and ``boxed``, what R1 and its distilled models
write: ``<think>…</think>`` then a summary whose last ``\boxed{…}`` is the answer."""

from __future__ import annotations

import re

from rlhf.rewards import REWARDS
from rlhf.tasks import TASKS

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)
_FORMAT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.S)


ANSWER_STYLES = ("tag", "boxed")
BOXED = "\\boxed"


def answer_style(sample: dict | None) -> str:
    return ((sample or {}).get("metadata") or {}).get("answer_style") or "tag"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (braces balanced, nested ones kept), or None."""
    start = text.rfind(BOXED + "{")
    if start < 0:
        return None
    depth, begin = 0, start + len(BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1 : i]
    return None


def extract_answer(completion: str, sample: dict | None = None) -> str | None:
    """The final answer in the sample's convention (module doc), never one inside the reasoning (before the
    first ``</think>``): the last ``\\boxed{}`` after it, or the text inside the first
    ``<answer>...</answer>`` when that block opens after it; None when there is none."""
    end = completion.find(THINK_END)
    if end < 0:
        return None
    if answer_style(sample) == "boxed":
        return last_boxed(completion[end + len(THINK_END) :])
    return _tagged_answer(completion, after=end)


def _tagged_answer(completion: str, after: int) -> str | None:
    """The text inside the first ``<answer>...</answer>``, or None; None too when it opens at or before
    `after` (inside the reasoning). Later blocks never count, so listing candidates in several blocks (or
    one in the reasoning, then another) earns nothing. Linear time: the regex ``<answer>(.*?)</answer>`` it
    replaces was quadratic on a run of unclosed ``<answer>`` tags (11 s for 128k characters)."""
    start = completion.find(ANSWER)
    if start <= after:
        return None
    start += len(ANSWER)
    end = completion.find(ANSWER_END, start)
    return None if end < 0 else completion[start:end]


@REWARDS.register("format")
def format_reward(completion: str, sample: dict) -> float:
    """1.0 iff the response is ``<think>...</think> <answer>...</answer>``, each tag once, both filled; in
    the boxed convention, ``<think>...</think>`` once, filled, then a summary with a filled ``\\boxed{}``."""
    response = THINK + completion
    if answer_style(sample) == "boxed":
        reasoning, closed, summary = response[len(THINK) :].partition(THINK_END)
        once = response.count(THINK) == 1 and response.count(THINK_END) == 1
        return 1.0 if once and closed and reasoning.strip() and (last_boxed(summary) or "").strip() else 0.0
    if any(response.count(tag) != 1 for tag in TAGS):
        return 0.0
    m = _FORMAT_RE.fullmatch(response)
    return 1.0 if m is not None and m.group(1).strip() and m.group(2).strip() else 0.0


@REWARDS.register("accuracy")
def accuracy(completion: str, sample: dict) -> float:
    answer = extract_answer(completion, sample)
    if answer is None:
        return 0.0
    task = TASKS.find(sample["task"])
    if task is None or task.score is None:
        raise KeyError(f"no scorer for task {sample['task']!r}; tasks with one: {TASKS.names()}")
    return float(task.score(answer, sample))


@REWARDS.register("format_gated_accuracy")
def format_gated_accuracy(completion: str, sample: dict) -> float:
    """Accuracy counted only when the format is right: with no separate format reward, this kept a weak
    base from collapsing into "short guess, correct format" (the tiny R1-Zero demo's lesson)."""
    return accuracy(completion, sample) if format_reward(completion, sample) else 0.0
