"""Math with a verifiable final answer (file rows' default task): math-verify compares the answer with the
gold as mathematical objects, so ``0.5``, ``\\frac{1}{2}`` and ``1/2`` agree."""

from __future__ import annotations

import functools
import re
import threading

from math_verify import parse, verify
from sympy import Eq, Symbol
from sympy.core.relational import Relational

from core.errors import DataError
from rlhf.tasks import TASKS, Task

_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_APPROX = ("\\approx", "\\simeq", "\\thickapprox", "≈")  # math-verify drops these and keeps the left side
# LaTeX spacing between two digits (``10 000``, ``1\\,000``, ``1~000``): LaTeX renders the digits as one
# number, while math-verify reads the gap as a product or a mixed number (10·0 = 0, ``12 5`` = 12 + 5).
_DIGIT_GAP = re.compile(r"(?<=\d)(?:\s|\\[,;:! ]|~)+(?=\d)")


def _timeout(seconds: int) -> int | None:
    # math-verify times itself out with signal.alarm, which only works in a main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """math-verify's parse; text without math delimiters is read as LaTeX math first (``x^2+1`` and
    ``\\frac12`` parse only that way), then as plain text. An escaped ``\\$`` (``\\$18.90``) is not a
    delimiter, and spacing between digits is dropped as LaTeX does (``10 000`` and ``1\\,000`` are 10000)."""
    text = _DIGIT_GAP.sub("", text)
    out = []
    if not any(d in text.replace("\\$", "") for d in _MATH_DELIMITERS):
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


def score(answer: str, sample: dict) -> float:
    pred, gold_text = parse_math(answer.strip()), sample["answer"].strip()
    gold = list(_parse_gold(gold_text))
    if not is_parsed(pred) or _refused_relation(answer, pred, gold_text, gold):
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=_timeout(5)) else 0.0


def _refused_relation(answer: str, pred: list, gold_text: str, gold: list) -> bool:
    """An answer that is a relation where the gold is a value: math-verify compares only a relation's
    right side (``1+1=7``, ``5=7`` match gold 7) and reads ``7 \\approx 5`` as its left side, so any claim
    ending in the gold would earn accuracy. Only ``symbol = value`` (``x=7``) stands for a value; other
    equations and approximations are refused unless the gold is one itself."""
    if _relation(gold) is not None or any(a in gold_text for a in _APPROX):
        return False
    if any(a in answer for a in _APPROX):
        return True
    first = _relation(pred)
    return isinstance(first, Eq) and not isinstance(first.lhs, Symbol)


def _relation(parsed: list):
    first = next((x for x in parsed if not isinstance(x, str)), None)
    return first if isinstance(first, Relational) else None


def check_gold(row: dict, where: str) -> None:
    gold = row.get("answer")
    if not is_parsed(list(_parse_gold(str(gold).strip()))):
        raise DataError(
            f"{where}: math-verify cannot parse the gold answer {gold!r:.80} (field 'answer'), so no "
            f"completion could ever score. Fix: write it as a number or LaTeX (42, \\frac{{1}}{{2}}, "
            f"x^2+1, \\{{1,2\\}}), give the row a 'task' with its own scorer, or drop the row"
        )


TASK = TASKS.register("math", Task("math", score=score, check_gold=check_gold))
