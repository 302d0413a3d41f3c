"""Sort a string of digits: the example of a task added in one file (its generator, scorer and gold check,
registered at the bottom). ``data.task=sort_digits`` generates it; a file row with ``"task": "sort_digits"``
is scored by it.

    question  Sort the digits of 52913 in ascending order.    answer  12359

Numbers whose hash falls in the held-out fifth appear only in evaluation.
"""

from __future__ import annotations

import hashlib
import random

from core.errors import DataError
from rlhf.tasks import TASKS, Task

MIN_DIGITS, MAX_DIGITS = 3, 8


def is_held_out(digits: str) -> bool:
    return hashlib.sha256(digits.encode()).digest()[0] % 5 == 0


def question(digits: str) -> str:
    return f"Sort the digits of {digits} in ascending order."


def prompt_rows(data_cfg, split: str, n: int) -> list[dict]:
    """n rows from the split's numbers; seeds differ per split so train and eval never share a draw."""
    rng, held_out, rows = random.Random(f"{data_cfg.seed}/{split}"), split == "eval", []
    while len(rows) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        if is_held_out(digits) == held_out:
            rows.append({"question": question(digits), "answer": "".join(sorted(digits)), "task": "sort_digits"})
    return [{**r, "metadata": {}} for r in rows]


def score(answer: str, row: dict) -> float:
    """1.0 iff the answer, spaces and commas between digits ignored, is the sorted digits."""
    return 1.0 if answer.replace(" ", "").replace(",", "").strip() == row["answer"] else 0.0


def check_gold(row: dict, where: str) -> None:
    gold = row.get("answer")
    if not isinstance(gold, str) or not gold.isdigit() or list(gold) != sorted(gold):
        raise DataError(f"{where}: sort_digits needs the sorted digits as the answer, got {gold!r:.40}. Fix: sort them")


TASK = TASKS.register("sort_digits", Task("sort_digits", score=score, check_gold=check_gold, prompts=prompt_rows))
