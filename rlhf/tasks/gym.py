"""reasoning-gym datasets as tasks: ``data.task=countdown`` generates its rows, each of task
``rg/countdown``, scored by reasoning-gym's own scorer counted 0/1. Presets in conf/data: countdown,
basic_arithmetic, gsm_symbolic; any other name in reasoning_gym.factory.DATASETS works too.

Train and eval come from seeds 10^9 apart, and eval questions that also occur in train are dropped.
"""

from __future__ import annotations

import ast
import functools
import re
import sys

from core.errors import ConfigError, DataError
from rlhf.tasks import Task

PREFIX = "rg/"
# reasoning-gym seeds item i with seed + i: an eval seed of seed + 1 would replay the train items
# shifted by one, so eval starts far beyond any train size.
EVAL_SEED_OFFSET = 10**9


@functools.cache
def task(name: str) -> Task | None:
    """The task of reasoning-gym dataset `name` (as NAME or rg/NAME), or None if there is none."""
    from reasoning_gym.factory import DATASETS  # ~1 s to import: only for names no registered task has

    dataset = name.removeprefix(PREFIX)
    if dataset not in DATASETS:
        return None
    return Task(PREFIX + dataset, score=score, check_gold=check_gold, prompts=functools.partial(prompt_rows, dataset))


def prompt_rows(dataset: str, data_cfg, split: str, n: int) -> list[dict]:
    train = _entries(dataset, data_cfg.num_train if split == "eval" else n, data_cfg.seed)
    if split == "train":
        return [_row(dataset, e) for e in train]
    candidates = _entries(dataset, 2 * n + 16, data_cfg.seed + EVAL_SEED_OFFSET) if n else ()
    seen, rows = {e["question"] for e in train}, []
    for entry in candidates:
        if entry["question"] not in seen and len(rows) < n:
            seen.add(entry["question"])
            rows.append(_row(dataset, entry))
    if len(rows) < n:
        raise ConfigError(
            f"data.task={dataset}: only {len(rows)} of {len(candidates)} generated eval questions are new (not "
            f"in train, not repeated); the task has too few distinct questions for data.num_eval={n}. "
            "Fix: lower data.num_eval or data.num_train, or pick a harder difficulty."
        )
    return rows


@functools.lru_cache(maxsize=8)
def _entries(dataset: str, size: int, seed: int) -> tuple[dict, ...]:
    # Cached: the eval split needs the train questions, and countdown takes ~15 ms an item to generate.
    # Rows share these entries as metadata.entry: read-only.
    import reasoning_gym

    if size == 0:
        return ()
    generated = reasoning_gym.create_dataset(dataset, size=size, seed=seed)
    return tuple(generated[i] for i in range(size))


def _row(dataset: str, entry: dict) -> dict:
    question, answer = entry["question"], str(entry["answer"])
    return {"question": question, "answer": answer, "task": PREFIX + dataset, "metadata": {"entry": entry}}


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


def score(answer: str, sample: dict) -> float:
    name = sample["task"].removeprefix(PREFIX)
    answer = answer.strip()
    if name in _RG_PARSE_EXPR and not _plain_math(answer):
        return 0.0  # never a right answer there (tests/test_fuzz.py checks the generated golds pass)
    value = _rg_dataset(name).score_answer(answer, sample["metadata"]["entry"])
    # reasoning-gym gives partial credit for the form (countdown: 0.05 for any expression using the
    # numbers, 0.01 for any text); that is format reward, which would dilute R1-Zero's 0/1 accuracy.
    return 1.0 if value >= 1.0 else 0.0


def check_gold(row: dict, where: str) -> None:
    entry = (row.get("metadata") or {}).get("entry")
    if not isinstance(entry, dict) or "answer" not in entry:
        raise DataError(
            f"{where}: task {row['task']!r} needs the reasoning_gym entry in metadata.entry (its scorer reads "
            "it). Fix: store the generated entry there, as data.source=generated does"
        )
