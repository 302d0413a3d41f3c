"""The R1-Zero rule rewards: format (tags in order) and accuracy (the answer against the gold, per task).

Accuracy looks the sample's ``task`` up in SCORERS; a scorer takes the text inside ``<answer>`` and the
sample. Built in: ``addition`` (exact match), ``math`` (math-verify), ``rg/<dataset>`` (reasoning-gym's
own scorer for that dataset). Add one with ``@register_scorer("task")``.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Callable, Sequence

from math_verify import parse, verify

from rlhf.rewards import register_reward

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)
_FORMAT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.S)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")

Scorer = Callable[[str, dict], float]
SCORERS: dict[str, Scorer] = {}


def register_scorer(task: str) -> Callable[[Scorer], Scorer]:
    def add(fn: Scorer) -> Scorer:
        SCORERS[task] = fn
        return fn

    return add


def scorer_for(task: str) -> Scorer:
    if task in SCORERS:
        return SCORERS[task]
    if task.startswith("rg/"):
        return _score_rg
    raise KeyError(f"no scorer for task {task!r}; registered: {sorted(SCORERS)} and rg/<reasoning_gym dataset>")


def extract_answer(completion: str) -> str | None:
    """The text inside the first ``<answer>...</answer>``, or None."""
    m = _ANSWER_RE.search(completion)
    return None if m is None else m.group(1)


@register_reward("format")
def format_reward(completion: str, sample: dict) -> float:
    """1.0 iff the response is ``<think>...</think> <answer>...</answer>``, each tag once, both filled."""
    response = THINK + completion
    if any(response.count(tag) != 1 for tag in TAGS):
        return 0.0
    m = _FORMAT_RE.fullmatch(response)
    return 1.0 if m is not None and m.group(1).strip() and m.group(2).strip() else 0.0


@register_reward("accuracy")
def accuracy(completion: str, sample: dict) -> float:
    answer = extract_answer(completion)
    return 0.0 if answer is None else float(scorer_for(sample["task"])(answer, sample))


@register_reward("format_gated_accuracy")
def format_gated_accuracy(completion: str, sample: dict) -> float:
    """Accuracy counted only when the format is right: with no separate format reward, this kept a weak
    base from collapsing into "short guess, correct format" (NOTES: what makes a tiny R1-Zero demo learn)."""
    return accuracy(completion, sample) if format_reward(completion, sample) else 0.0


@register_scorer("addition")
def _score_addition(answer: str, sample: dict) -> float:
    # The exact match of rlhf.tasks.addition.score (no stripping), so RL rewards and the pretraining
    # eval count the same answers right.
    return 1.0 if answer == sample["answer"] else 0.0


def _timeout(seconds: int) -> int | None:
    # math-verify times itself out with signal.alarm, which only works in a main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """math-verify's parse; text without math delimiters is read as LaTeX math first (``x^2+1`` and
    ``\\frac12`` parse only that way), then as plain text."""
    out = []
    if not any(d in text for d in _MATH_DELIMITERS):
        out = parse(f"${text}$", parsing_timeout=_timeout(5))
    if not is_parsed(out):
        out = parse(text, parsing_timeout=_timeout(5))
    return out


def is_parsed(parsed: list) -> bool:
    # parse falls back to the raw string when no expression matched: that is not a parse.
    return any(not isinstance(x, str) for x in parsed)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str) -> tuple:
    return tuple(parse_math(text))


@register_scorer("math")
def _score_math(answer: str, sample: dict) -> float:
    pred = parse_math(answer.strip())
    if not is_parsed(pred):
        return 0.0
    return 1.0 if verify(list(_parse_gold(sample["answer"].strip())), pred, timeout_seconds=_timeout(5)) else 0.0


@functools.cache
def _rg_dataset(name: str):
    import reasoning_gym  # ~1 s to import: only where an rg task is scored

    return reasoning_gym.create_dataset(name, size=1, seed=0)  # only its score_answer is used


def _score_rg(answer: str, sample: dict) -> float:
    name = sample["task"].removeprefix("rg/")
    score = _rg_dataset(name).score_answer(answer.strip(), sample["metadata"]["entry"])
    # reasoning-gym gives partial credit for the form (countdown: 0.05 for any expression using the
    # numbers, 0.01 for any text); that is format reward, which would dilute R1-Zero's 0/1 accuracy.
    return 1.0 if score >= 1.0 else 0.0


def validate_gold(rows: Sequence[dict], where: str = "rows") -> None:
    """Raises DataError for a row no scorer could ever reward: unknown task, a math gold answer
    math-verify cannot parse, an rg row without its reasoning-gym entry. Run at load time.

    A row's location is its ``_where`` ("data.jsonl line 3"), else ``f"{where} row {i}"``.
    """
    from core.data import DataError  # core imports torch: reward workers never need it

    for i, row in enumerate(rows):
        loc = row.get("_where") or f"{where} row {i}"
        task, gold = row.get("task"), row.get("answer")
        if not isinstance(task, str) or not (task in SCORERS or task.startswith("rg/")):
            raise DataError(
                f"{loc}: unknown task {task!r} (field 'task'). Fix: use one of {sorted(SCORERS)} or "
                f"rg/<reasoning_gym dataset>, or register a scorer with rlhf.rewards.register_scorer"
            )
        if task == "math" and not is_parsed(list(_parse_gold(str(gold).strip()))):
            raise DataError(
                f"{loc}: math-verify cannot parse the gold answer {gold!r:.80} (field 'answer'), so no "
                f"completion could ever score. Fix: write it as a number or LaTeX (42, \\frac{{1}}{{2}}, "
                f"x^2+1, \\{{1,2\\}}), give the row a 'task' with its own scorer, or drop the row"
            )
        if task.startswith("rg/"):
            _check_rg(row, task, loc, DataError)


def _check_rg(row: dict, task: str, loc: str, error: type[Exception]) -> None:
    from reasoning_gym.factory import DATASETS

    name = task.removeprefix("rg/")
    if name not in DATASETS:
        raise error(f"{loc}: task {task!r} names no reasoning_gym dataset. Fix: use rg/<one of {sorted(DATASETS)}>")
    entry = (row.get("metadata") or {}).get("entry")
    if not isinstance(entry, dict) or "answer" not in entry:
        raise error(
            f"{loc}: task {task!r} needs the reasoning_gym entry in metadata.entry (its scorer reads it). "
            "Fix: store the generated entry there, as rlhf.prompts does"
        )
