"""RL prompt rows for GRPO and held-out evaluation: the R1-Zero template and the prompt sources.

A row is ``{"prompt": templated text ending in "<think>", "answer": gold answer, "task": its task's name
(rlhf.tasks.TASKS, or rg/<dataset>), "metadata": dict}``; rows read from a file also carry ``"_where"``
("data.jsonl line 3") so later errors can point at the line.

Sources (``data.source``):

* ``generated``: the rows of task ``data.task``'s generator (rlhf.tasks: addition, bilingual, code,
  sort_digits, or any reasoning-gym dataset), each split from its own seed and held-out set.
* ``jsonl`` / ``parquet``: ``data.train_path`` (and ``data.eval_path``, else the last ``num_eval`` rows
  are held out), rows with ``prompt`` and ``answer`` (core.data), task ``math`` unless a row (or
  ``data.task``) says otherwise.

Gold answers are checked at load (rlhf.tasks.validate_gold); ``data.general_task`` mixes in its task's
prompts, which only reward models score.
"""

from __future__ import annotations

from pathlib import Path

from core.data import load_rows
from core.errors import ConfigError, DataError
from rlhf.rewards.rules import ANSWER_STYLES, last_boxed
from rlhf.tasks import FILE_ROW_TASK, TASKS, validate_gold

# DeepSeek-R1 paper, Table 1. It ends inside the think block, so completions start with the reasoning.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant: <think>"
)
# The tiny demo tasks' own: the tiny model has a 64-token context (rlhf.tasks.addition.make_prompt).
COMPACT_TEMPLATE = "User: {prompt} Assistant: <think>"
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "compact": COMPACT_TEMPLATE, "none": "{prompt}"}
CHAT = "chat"  # the tokenizer's own chat template (render_chat), not a format string
THINK_PREFIX = "<think>\n"  # what DeepSeek-R1's chat template puts after the assistant tag
SPLITS = ("train", "eval")
_FIELDS = ("prompt", "answer", "task", "metadata")
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")  # data.answer_format: where a file row's gold answer is


def load_prompts(data_cfg, split: str, tok=None, answer_style: str = "tag") -> list[dict]:
    """The ``split`` ("train" or "eval") prompt rows of ``data_cfg`` (core.config.DataConfig), templated
    for the run's tokenizer ``tok`` (needed by data.template=chat, and by auto to find its chat template),
    marked with the answer convention the rewards read (reward.answer: rlhf.rewards.rules)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if answer_style not in ANSWER_STYLES:
        raise ConfigError(f"reward.answer={answer_style!r}: expected one of {list(ANSWER_STYLES)}.")
    template = _template_name(data_cfg, tok)  # checked before generating anything
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
        question = row.pop("question")
        if template == CHAT:
            row["prompt"], row["chat"] = render_chat(tok, question, data_cfg.system_prompt, data_cfg.think_prefix), True
        else:
            row["prompt"] = fill(template, question)
        # A row may name its own target language (bilingual sets); else the data config's.
        row["metadata"] = {"language": data_cfg.language, **(row.get("metadata") or {}), "answer_style": answer_style}
    return rows


def _general(data_cfg, split: str, n_reasoning: int) -> list[dict]:
    """data.general_task's prompts, general_share of all rows, marked general."""
    if not data_cfg.general_task:
        return []
    task = TASKS.get(data_cfg.general_task, "data.general_task")
    make = task.need("prompts", "data.general_task", "mixing in general prompts")
    n = round(n_reasoning * data_cfg.general_share / (1 - data_cfg.general_share))
    rows = make(data_cfg, split, n)
    return [{**r, "metadata": {**(r.get("metadata") or {}), "general": True}} for r in rows]


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


def render_chat(tok, question: str, system: str | None, think_prefix: bool) -> str:
    """The question as the model's chat template renders a user turn (after an optional system turn), with
    the assistant's generation prompt and, with think_prefix, R1's "<think>\n" (unless the template wrote it)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if think_prefix and not text.rstrip().endswith("<think>"):
        text += THINK_PREFIX
    return text


def prompt_ids(tok, row: dict) -> list[int]:
    """A prompt row's token ids: a chat-rendered prompt already holds the special tokens its template
    wants (BOS included), a plain one gets the tokenizer's."""
    return tok(row["prompt"], add_special_tokens=not row.get("chat"))["input_ids"]


def _template_name(data_cfg, tok) -> str:
    name = data_cfg.template
    has_chat = tok is not None and bool(getattr(tok, "chat_template", None))
    if name == "auto":
        if has_chat:
            return CHAT
        return TASKS.get(data_cfg.task).template if data_cfg.source == "generated" else "r1_zero"
    if name == CHAT and not has_chat:
        raise ConfigError(
            "data.template=chat, but the run's tokenizer has no chat template. Fix: use a model directory whose "
            "tokenizer_config.json (or chat_template.jinja) has one, or data.template=r1_zero."
        )
    if name not in (*TEMPLATES, CHAT):
        raise ConfigError(f"data.template={name!r}: expected auto, {CHAT} or one of {sorted(TEMPLATES)}.")
    return name


def _generated(data_cfg, split: str) -> list[dict]:
    task = TASKS.get(data_cfg.task)
    make = task.need("prompts", "data.task", "data.source=generated")
    rows = make(data_cfg, split, data_cfg.num_train if split == "train" else data_cfg.num_eval)
    validate_gold(rows, where=f"data.task={data_cfg.task} {split}")  # code: fails here when no sandbox works
    return rows


def _from_files(data_cfg, split: str) -> list[dict]:
    if not data_cfg.train_path:
        raise ConfigError(f"data.source={data_cfg.source} needs data.train_path (rows with 'prompt' and 'answer').")
    own_file = split == "eval" and data_cfg.eval_path
    path = data_cfg.eval_path if own_file else data_cfg.train_path
    rows, k = _read(path, data_cfg), data_cfg.num_eval
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


def gold_answer(text: str, answer_format: str, where: str, key: str) -> str:
    """The gold final answer inside a file's answer field: as is (plain), after GSM8K's last ``####``, or
    the last ``\\boxed{}`` of a worked solution (MATH's ``solution``)."""
    if answer_format == "plain":
        return text
    if answer_format == "gsm8k":
        head, mark, tail = text.rpartition("####")
        if mark and tail.strip():
            return tail.strip().replace(",", "")
        fix = "end it with '#### <answer>', or set data.answer_format=plain"
    elif answer_format == "boxed":
        found = last_boxed(text)
        if found and found.strip():
            return found.strip()
        fix = "put the final answer in \\boxed{...}, or set data.answer_format=plain"
    else:
        raise ConfigError(f"data.answer_format={answer_format!r}: expected one of {list(ANSWER_FORMATS)}.")
    raise DataError(f"{where}: field '{key}' has no {answer_format} final answer ({text[-80:]!r}). Fix: {fix}.")


def _read(path: str, data_cfg) -> list[dict]:
    keys = {"prompt": data_cfg.prompt_key, "answer": data_cfg.answer_key}
    raw = load_rows(path, "prompt", keys)  # raises DataError naming the file, line and field of a bad row
    rows = []
    for where, r in zip(_locations(Path(path), len(raw)), raw):
        meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        # id, level, subject, a worked solution...: kept for logging
        extra = {k: v for k, v in r.items() if k not in _FIELDS and k not in keys.values()}
        rows.append(
            {
                "question": r[keys["prompt"]],
                "answer": gold_answer(r[keys["answer"]], data_cfg.answer_format, where, keys["answer"]),
                "task": r.get("task") or data_cfg.task or FILE_ROW_TASK,
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
