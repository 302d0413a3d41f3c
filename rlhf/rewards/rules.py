"""The R1-Zero rule rewards: format (tags in order) and accuracy (the answer against the gold, per task).

Accuracy looks the sample's ``task`` up in SCORERS; a scorer takes the text inside ``<answer>`` and the
sample. Built in: ``addition``, ``bilingual`` and ``greet`` (exact match), ``math`` (math-verify), ``rg/<dataset>`` (reasoning-gym's
own scorer for that dataset), ``code`` (hidden tests in a sandbox: rlhf.rewards.coding). Add one with
``@register_scorer("task")``.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import threading
from typing import Callable, Sequence

from math_verify import parse, verify

from rlhf.rewards import register_reward

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)
_FORMAT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.S)
_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
# LaTeX spacing between two digits (``10 000``, ``1\\,000``, ``1~000``): LaTeX renders the digits as one
# number, while math-verify reads the gap as a product or a mixed number (10·0 = 0, ``12 5`` = 12 + 5).
_DIGIT_GAP = re.compile(r"(?<=\d)(?:\s|\\[,;:! ]|~)+(?=\d)")

Scorer = Callable[[str, dict], float]
SCORERS: dict[str, Scorer] = {}
# Rows no rule can check (free-form answers): only rejection sampling's generative judge (rlhf.judge) scores them.
JUDGED = "judged"
VERDICTS = ("yes", "no")  # the judge's answers; "yes": the prediction says what the reference says


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
    """The text inside the first ``<answer>...</answer>``, or None. Later blocks never count, so listing
    candidates in several blocks earns nothing. Linear time: the regex ``<answer>(.*?)</answer>`` it
    replaces was quadratic on a run of unclosed ``<answer>`` tags (11 s for 128k characters)."""
    start = completion.find(ANSWER)
    if start < 0:
        return None
    start += len(ANSWER)
    end = completion.find(ANSWER_END, start)
    return None if end < 0 else completion[start:end]


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
@register_scorer("bilingual")
@register_scorer("greet")  # only held-out greetings carry an answer: it measures what the reward models taught
def _exact(answer: str, sample: dict) -> float:
    # The exact match of rlhf.tasks.addition.score (no stripping), so RL rewards and the pretraining
    # eval count the same answers right.
    return 1.0 if answer == sample["answer"] else 0.0


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


@register_scorer("math")
def _score_math(answer: str, sample: dict) -> float:
    pred = parse_math(answer.strip())
    if not is_parsed(pred):
        return 0.0
    return 1.0 if verify(list(_parse_gold(sample["answer"].strip())), pred, timeout_seconds=_timeout(5)) else 0.0


# reasoning-gym scorers that run the answer as Python. Unguarded, a completion runs code in the reward
# worker: it can exit it (exit()), or patch the scorer so that it and every later answer there score 1
# (countdown: "setattr(__import__('numpy'), 'isclose', 'x'.format) or <the numbers>"; tests/test_fuzz.py).
# These eval() it only for partial credit (a Python list), which _score_rg drops: literals only.
_RG_EVAL = frozenset({"binary_matrix", "n_queens", "spiral_matrix", "string_insertion"})
# These need sympy.parse_expr (an eval) for full credit: only arithmetic and math functions reach it.
_RG_PARSE_EXPR = frozenset(
    {"countdown", "intermediate_integration", "polynomial_multiplication", "puzzle24", "simple_integration"}
)
_MATH_NAMES = frozenset(
    "sin cos tan cot sec csc asin acos atan acot asec acsc sinh cosh tanh coth sech csch asinh acosh atanh "
    "acoth exp log ln sqrt cbrt root Abs abs sign floor ceiling factorial binomial gamma pi oo Integral".split()
)
# Non-ASCII (Python reads fullwidth ｅｘｉｔ as exit), string literals, attribute access, dunders.
_NOT_PLAIN_MATH = re.compile(r"[^\t\n\r\x20-\x7e]|['\"`\\]|__|\.\s*[A-Za-z_]")
_NAME = re.compile(r"[A-Za-z_]\w*")


def _plain_math(answer: str) -> bool:
    """Whether ``answer`` holds only numbers, operators, brackets, one-letter symbols and _MATH_NAMES:
    with no strings, attributes or other names, parse_expr's eval can call nothing but math."""
    return not _NOT_PLAIN_MATH.search(answer) and all(len(w) == 1 or w in _MATH_NAMES for w in _NAME.findall(answer))


def _literal_eval(source, *_):
    return ast.literal_eval(source)


@functools.cache
def _rg_dataset(name: str):
    import reasoning_gym  # ~1 s to import: only where an rg task is scored

    dataset = reasoning_gym.create_dataset(name, size=1, seed=0)  # only its score_answer is used
    if name in _RG_EVAL:  # a module global shadows the builtin for the scorer's eval(answer)
        sys.modules[type(dataset).__module__].eval = _literal_eval
    return dataset


def _score_rg(answer: str, sample: dict) -> float:
    name = sample["task"].removeprefix("rg/")
    answer = answer.strip()
    if name in _RG_PARSE_EXPR and not _plain_math(answer):
        return 0.0  # never a right answer there (tests/test_fuzz.py checks the generated golds pass)
    score = _rg_dataset(name).score_answer(answer, sample["metadata"]["entry"])
    # reasoning-gym gives partial credit for the form (countdown: 0.05 for any expression using the
    # numbers, 0.01 for any text); that is format reward, which would dilute R1-Zero's 0/1 accuracy.
    return 1.0 if score >= 1.0 else 0.0


def validate_gold(rows: Sequence[dict], where: str = "rows") -> None:
    """Raises DataError for a row no scorer could ever reward: unknown task, a math gold answer
    math-verify cannot parse, an rg row without its reasoning-gym entry, a code row without usable hidden
    tests (and SandboxUnavailable when code cannot be sandboxed here). Run at load time.

    A row's location is its ``_where`` ("data.jsonl line 3"), else ``f"{where} row {i}"``.
    """
    from core.data import DataError  # core imports torch: reward workers never need it

    for i, row in enumerate(rows):
        loc = row.get("_where") or f"{where} row {i}"
        task, gold = row.get("task"), row.get("answer")
        if not isinstance(task, str) or not (task in SCORERS or task.startswith("rg/") or task == JUDGED):
            raise DataError(
                f"{loc}: unknown task {task!r} (field 'task'). Fix: use one of {sorted(SCORERS)} or "
                f"rg/<reasoning_gym dataset>, register a scorer with rlhf.rewards.register_scorer, or, for "
                f"answers no rule can check, {JUDGED!r} (rejection sampling asks a generative judge)"
            )
        if task == "math" and not is_parsed(list(_parse_gold(str(gold).strip()))):
            raise DataError(
                f"{loc}: math-verify cannot parse the gold answer {gold!r:.80} (field 'answer'), so no "
                f"completion could ever score. Fix: write it as a number or LaTeX (42, \\frac{{1}}{{2}}, "
                f"x^2+1, \\{{1,2\\}}), give the row a 'task' with its own scorer, or drop the row"
            )
        if task.startswith("rg/"):
            _check_rg(row, task, loc, DataError)
        if task == "code":
            from rlhf.rewards.coding import check_code_row

            check_code_row(row, loc, DataError)


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
