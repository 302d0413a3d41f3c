"""Tasks: everything particular to one kind of problem, as one ``Task`` object per task in ``TASKS``.

Generic code asks the task (``TASKS.get(name).score``), never compares task names. A prompt row names its
task (``row["task"]``); ``data.task`` picks the task whose generator makes a generated dataset. Adding one
is a file in this package that registers its ``Task``, plus its module name in ``BUILT_IN`` below (or any
module imported before the run: ``TASKS.register`` works from anywhere)::

    TASKS.register("sort_digits", Task("sort_digits", score=exact_match, prompts=rows))

Reasoning-gym datasets are tasks too, without registration: ``data.task=countdown`` generates them, rows
name them ``rg/countdown`` (rlhf.tasks.gym).

Light on purpose (no torch): reward workers import it to score. Fields that need torch (``final_eval``)
import it inside the function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from core.errors import ConfigError, DataError
from core.registry import Registry

Scorer = Callable[[str, dict], float]


@dataclass(frozen=True)
class Task:
    """One task; every field but ``name`` is optional, and a stage that needs a missing one says so."""

    name: str
    # Accuracy: (the text inside <answer>, the prompt row) -> 1.0 or 0.0. None: no rule can check the
    # answers (a generative judge does, in rejection sampling).
    score: Scorer | None = None
    # (row, where) -> None; raises DataError naming `where` for a row no completion could ever earn.
    check_gold: Callable[[dict, str], None] | None = None
    # (data config, split "train" | "eval", n) -> n rows {question, answer, task, metadata}, untemplated.
    prompts: Callable[[Any, str, int], list[dict]] | None = None
    template: str = "r1_zero"  # its prompt template under data.template=auto (rlhf.prompts.TEMPLATES)
    pretraining_text: Callable[[int, int], list[str]] | None = None  # (n, seed) -> texts for stage=pretrain
    sft_rows: Callable[[int, int, Any], list[dict]] | None = None  # (n, seed, cfg) -> {prompt, response}
    preference_pairs: Callable[[int, int, bool], list[dict]] | None = None  # (n, seed, held_out) -> pairs
    # (completion, row) -> {rate name: 0..1}: what held-out evaluation reports beyond accuracy.
    audit: Callable[[str, dict], dict[str, float]] | None = None
    # (cfg, policy, tokenizer) -> summary entries: the held-out check ending a supervised run on this task.
    final_eval: Callable[[Any, Any, Any], dict] | None = None
    # completion -> whether it starts with the task's reasoning; evaluation reports the share.
    reasoning_first: Callable[[str], bool] | None = None

    @property
    def rule_checkable(self) -> bool:
        return self.score is not None

    def need(self, field: str, key: str, purpose: str, instead: str = "give the data as a file") -> Callable:
        """This task's `field`, or a ConfigError naming `key`, what it was for, the tasks that have one and
        the other way to give the data (`instead`)."""
        fn = getattr(self, field)
        if fn is None:
            have = [name for name, t in TASKS.items() if getattr(t, field) is not None]
            raise ConfigError(
                f"{key}={self.name!r}: that task has no {field.replace('_', ' ')}, which {purpose} needs. "
                f"Fix: use a task that has one ({', '.join(have)}), or {instead}."
            )
        return fn


def exact_match(answer: str, row: dict) -> float:
    """1.0 iff the answer is the gold byte for byte (no stripping): the rule of the generated tasks, whose
    golds are short canonical strings."""
    return 1.0 if answer == row["answer"] else 0.0


def _reasoning_gym(name: str) -> Task | None:
    from rlhf.tasks import gym

    return gym.task(name)


FILE_ROW_TASK = "math"  # the task of a file's prompt row that names none (and no data.task is given)

# The built-in tasks' modules, imported on the first lookup.
BUILT_IN = (
    "rlhf.tasks.addition",
    "rlhf.tasks.bilingual",
    "rlhf.tasks.code",
    "rlhf.tasks.general",
    "rlhf.tasks.judge",
    "rlhf.tasks.math",
    "rlhf.tasks.multiplication",
    "rlhf.tasks.sort_digits",
)
TASKS: Registry[Task] = Registry(
    "task",
    "data.task",
    modules=BUILT_IN,
    resolve=_reasoning_gym,
    hint="Or a reasoning-gym dataset as NAME or rg/NAME: the presets countdown, basic_arithmetic, gsm_symbolic, "
    "or any other in reasoning_gym.factory.DATASETS.",
)


def validate_gold(rows: Sequence[dict], where: str = "rows") -> None:
    """Raises DataError for a row no scorer could ever reward: an unknown task, or a gold answer its task
    rejects (a math answer math-verify cannot parse, a code row without usable hidden tests, ...). Run at
    load time. A row's location is its ``_where`` ("data.jsonl line 3"), else ``f"{where} row {i}"``."""
    for i, row in enumerate(rows):
        loc = row.get("_where") or f"{where} row {i}"
        name = row.get("task")
        task = TASKS.find(name) if isinstance(name, str) else None
        if task is None:
            raise DataError(
                f"{loc}: unknown task {name!r} (field 'task'). Fix: use one of {TASKS.names()} or "
                "rg/<reasoning_gym dataset>, register one in rlhf.tasks.TASKS, or, for answers no rule can "
                "check, 'judged' (rejection sampling asks a generative judge)"
            )
        if task.check_gold is not None:
            task.check_gold(row, loc)


def modules_of_scorers() -> list[str]:
    """The modules defining every registered task's scorer: a reward worker imports them, so a task
    registered outside this package scores there too."""
    return sorted({t.score.__module__ for _, t in TASKS.items() if t.score is not None})
