"""RL prompt rows for GRPO and held-out evaluation: the R1-Zero template and the prompt sources.

A row is ``{"prompt": templated text ending in "<think>", "answer": gold answer, "task": scorer name
(rlhf.rewards.rules.SCORERS, or rg/<dataset>), "metadata": dict}``; rows read from a file also carry
``"_where"`` ("data.jsonl line 3") so later errors can point at the line.

Sources (``data.source``):

* ``generated``: ``data.task`` = ``addition`` (the tiny demo: train pairs vs pairs held out by hash), ``bilingual``
  (rlhf.tasks.bilingual: one-digit sums reasoned in English or Spanish words), ``code``
  (rlhf.tasks.code: write a Python function, scored on hidden tests in a sandbox; specs held out by hash)
  or a reasoning-gym dataset (presets: countdown, basic_arithmetic, gsm_symbolic; any other works too).
  Train and eval come from seeds 10^9 apart, and eval questions that also occur in train are dropped.
* ``jsonl`` / ``parquet``: ``data.train_path`` (and ``data.eval_path``, else the last ``num_eval`` rows
  are held out), rows with ``prompt`` and ``answer`` (core.data), task ``math`` unless a row (or
  ``data.task``) says otherwise. Gold answers are checked at load (rlhf.rewards.validate_gold).
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from core.config import ConfigError
from core.data import DataError, load_rows
from rlhf.rewards import validate_gold
from rlhf.tasks import addition, bilingual, code, general

# DeepSeek-R1 paper, Table 1. It ends inside the think block, so completions start with the reasoning.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant: <think>"
)
# The addition demo's own: the tiny model has a 64-token context (rlhf.tasks.addition.make_prompt).
COMPACT_TEMPLATE = "User: {prompt} Assistant: <think>"
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "compact": COMPACT_TEMPLATE, "none": "{prompt}"}
SPLITS = ("train", "eval")
RG_PRESETS = ("countdown", "basic_arithmetic", "gsm_symbolic")
# reasoning-gym seeds item i with seed + i: an eval seed of seed + 1 would replay the train items
# shifted by one, so eval starts far beyond any train size.
EVAL_SEED_OFFSET = 10**9
_FIELDS = ("prompt", "answer", "task", "metadata")


def load_prompts(data_cfg, split: str) -> list[dict]:
    """The ``split`` ("train" or "eval") prompt rows of ``data_cfg`` (core.config.DataConfig)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    template = _template_name(data_cfg)  # checked before generating anything
    if (split == "train" and data_cfg.num_train < 1) or data_cfg.num_eval < 0:
        raise ConfigError(
            f"data.num_train={data_cfg.num_train}, data.num_eval={data_cfg.num_eval}. "
            "Fix: num_train >= 1 and num_eval >= 0."
        )
    if data_cfg.source == "generated":
        rows = _generated(data_cfg, split)
    elif data_cfg.source in ("jsonl", "parquet"):
        rows = _from_files(data_cfg, split)
    else:
        raise ConfigError(f"data.source={data_cfg.source!r}: expected generated, jsonl or parquet.")
    rows += _general(data_cfg, split, len(rows))
    for row in rows:
        row["prompt"] = fill(template, row.pop("question"))
        # A row may name its own target language (bilingual sets); else the data config's.
        row["metadata"] = {"language": data_cfg.language, **(row.get("metadata") or {})}
    return rows


def _general(data_cfg, split: str, n_reasoning: int) -> list[dict]:
    """data.general_task's prompts, general_share of all rows. Train rows carry no answer: no rule scores
    them (rlhf.general_rl asks reward models); held-out rows keep the expected one to measure the policy."""
    if not data_cfg.general_task:
        return []
    if data_cfg.general_task != "greet":
        raise ConfigError(f"data.general_task={data_cfg.general_task!r}: expected greet (rlhf.tasks.general).")
    n = round(n_reasoning * data_cfg.general_share / (1 - data_cfg.general_share))
    rows = general.prompts(n, data_cfg.seed + (0 if split == "train" else 1), held_out=split == "eval")
    return [
        {
            "question": r["question"],
            "answer": None if split == "train" else r["answer"],
            "task": r["task"],
            "metadata": {"general": True},
        }
        for r in rows
    ]


def is_general(row: dict) -> bool:
    """A prompt only reward models can score: the general rows above, or any row without a gold answer."""
    return row.get("answer") is None


def fill(template: str, question: str) -> str:
    """``TEMPLATES[template]`` around ``question``; "none" leaves it byte for byte."""
    if template == "none":
        return question
    question = question.strip()
    if template == "r1_zero":  # the template adds its own period after the question: no "formatting.. Assistant"
        question = question.removesuffix(".")
    return TEMPLATES[template].format(prompt=question)


def _template_name(data_cfg) -> str:
    name = data_cfg.template
    if name == "auto":
        return "compact" if data_cfg.source == "generated" and data_cfg.task in ("addition", "bilingual") else "r1_zero"
    if name not in TEMPLATES:
        raise ConfigError(f"data.template={name!r}: expected auto or one of {sorted(TEMPLATES)}.")
    return name


def _generated(data_cfg, split: str) -> list[dict]:
    task = data_cfg.task or ""
    if task == "addition":
        make = addition.train_prompts if split == "train" else addition.eval_prompts
        n = data_cfg.num_train if split == "train" else data_cfg.num_eval
        return [
            {"question": _addition_question(r["prompt"]), "answer": r["answer"], "task": "addition", "metadata": {}}
            for r in make(n, seed=data_cfg.seed)
        ]
    if task == "code":
        return _code_rows(data_cfg, split)
    if task == "bilingual":
        n = data_cfg.num_train if split == "train" else data_cfg.num_eval
        return bilingual.prompts(n, data_cfg.seed + (0 if split == "train" else 1))
    from reasoning_gym.factory import DATASETS

    name = task.removeprefix("rg/")
    if name not in DATASETS:
        close = difflib.get_close_matches(name, ["addition", "bilingual", "code", *DATASETS], n=3)
        raise ConfigError(
            f"data.task={data_cfg.task!r}: source=generated makes 'addition', 'bilingual', 'code' or a reasoning-gym dataset"
            f"{f' (close: {close})' if close else ''}. Fix: use addition, code, one of the presets {list(RG_PRESETS)}, "
            f"or another of the {len(DATASETS)} names in reasoning_gym.factory.DATASETS."
        )
    train = _rg_entries(name, data_cfg.num_train, data_cfg.seed)
    if split == "train":
        return [_rg_row(name, e) for e in train]
    return _rg_eval(name, data_cfg, {e["question"] for e in train})


def _code_rows(data_cfg, split: str) -> list[dict]:
    try:
        rows = (
            code.train_rows(data_cfg.num_train, data_cfg.seed)
            if split == "train"
            else code.eval_rows(data_cfg.num_eval, data_cfg.seed)
        )
    except ValueError as e:
        raise ConfigError(f"data.task=code: {e}. Fix: lower data.num_eval.") from e
    validate_gold(rows, where=f"data.task=code {split}")  # also fails here, not mid-run, when no sandbox works
    return rows


def _addition_question(prompt: str) -> str:
    question = prompt.removeprefix("User: ").removesuffix(" Assistant: <think>")
    assert COMPACT_TEMPLATE.format(prompt=question) == prompt, "addition.make_prompt no longer matches COMPACT_TEMPLATE"
    return question


@functools.lru_cache(maxsize=8)
def _rg_entries(name: str, size: int, seed: int) -> tuple[dict, ...]:
    # Cached: the eval split needs the train questions, and countdown takes ~15 ms an item to generate.
    # Rows share these entries as metadata.entry: read-only.
    import reasoning_gym

    if size == 0:
        return ()
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed)
    return tuple(dataset[i] for i in range(size))


def _rg_row(name: str, entry: dict) -> dict:
    return {
        "question": entry["question"],
        "answer": str(entry["answer"]),
        "task": f"rg/{name}",
        "metadata": {"entry": entry},
    }


def _rg_eval(name: str, data_cfg, train_questions: set[str]) -> list[dict]:
    n = data_cfg.num_eval
    candidates = _rg_entries(name, 2 * n + 16, data_cfg.seed + EVAL_SEED_OFFSET) if n else ()
    seen, rows = set(train_questions), []
    for entry in candidates:
        if entry["question"] not in seen and len(rows) < n:
            seen.add(entry["question"])
            rows.append(_rg_row(name, entry))
    if len(rows) < n:
        raise ConfigError(
            f"data.task={name}: only {len(rows)} of {len(candidates)} generated eval questions are new (not "
            f"in train, not repeated); the task has too few distinct questions for data.num_eval={n}. "
            "Fix: lower data.num_eval or data.num_train, or pick a harder difficulty."
        )
    return rows


def _from_files(data_cfg, split: str) -> list[dict]:
    if not data_cfg.train_path:
        raise ConfigError(f"data.source={data_cfg.source} needs data.train_path (rows with 'prompt' and 'answer').")
    own_file = split == "eval" and data_cfg.eval_path
    path = data_cfg.eval_path if own_file else data_cfg.train_path
    rows, k = _read(path, data_cfg.task), data_cfg.num_eval
    if not own_file and not data_cfg.eval_path and k:  # hold out the last num_eval rows
        if len(rows) <= k:
            raise DataError(
                f"{path}: {len(rows)} rows, and holding out data.num_eval={k} for eval leaves none to "
                "train on. Fix: set data.eval_path, or lower data.num_eval."
            )
        rows = rows[:-k] if split == "train" else rows[-k:]
    rows = rows[: data_cfg.num_train if split == "train" else k]
    validate_gold(rows, where=str(path))
    return rows


def _read(path: str, default_task: str | None) -> list[dict]:
    raw = load_rows(path, "prompt")  # raises DataError naming the file and line of a bad row
    rows = []
    for where, r in zip(_locations(Path(path), len(raw)), raw):
        meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        extra = {k: v for k, v in r.items() if k not in _FIELDS}  # id, level, subject...: kept for logging
        rows.append(
            {
                "question": r["prompt"],
                "answer": r["answer"],
                "task": r.get("task") or default_task or "math",
                "metadata": {**extra, **meta},
                "_where": where,
            }
        )
    return rows


def _locations(path: Path, n: int) -> list[str]:
    """Where each of load_rows' rows came from, in its own words (it skips blank JSONL lines)."""
    if path.suffix.lower() == ".parquet":
        return [f"{path} row {i} (0-based)" for i in range(n)]
    with open(path, "rb") as f:  # decoded as load_rows does, so a BOM-only first line counts as blank too
        lines = [(k, raw.decode("utf-8-sig" if k == 1 else "utf-8")) for k, raw in enumerate(f, start=1)]
    out = [f"{path} line {k}" for k, line in lines if line.strip()]
    assert len(out) == n, f"{path}: {len(out)} non-blank lines but load_rows returned {n} rows"
    return out
