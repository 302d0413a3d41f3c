"""The task registry: a task added in one file (rlhf/tasks/sort_digits.py) runs through the generic code,
and every registered task's fields have the shapes the stages call them with."""

import pytest

from core.config import DataConfig
from core.data import DataError
from core.errors import ConfigError
from rlhf.prompts import R1_ZERO_TEMPLATE, load_prompts
from rlhf.rewards import REWARDS
from rlhf.tasks import TASKS, validate_gold


def data(**kw) -> DataConfig:
    return DataConfig(**{"source": "generated", "num_train": 40, "num_eval": 12, "seed": 3, **kw})


def test_a_task_in_one_file_generates_templates_and_scores():
    train, evals = load_prompts(data(task="sort_digits"), "train"), load_prompts(data(task="sort_digits"), "eval")
    assert len(train) == 40 and len(evals) == 12
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}  # held out by hash
    row = evals[0]
    assert row["task"] == "sort_digits" and row["prompt"].startswith(R1_ZERO_TEMPLATE[:40])
    digits = row["prompt"].split("Sort the digits of ")[1].split(" ")[0]
    assert row["answer"] == "".join(sorted(digits))
    acc = REWARDS["accuracy"]
    assert acc(f"r</think><answer>{' '.join(row['answer'])}</answer>", row) == 1.0
    assert acc(f"r</think><answer>{digits[::-1]}0</answer>", row) == 0.0
    assert load_prompts(data(task="sort_digits"), "eval") == evals  # deterministic


def test_its_gold_check_runs_at_load():
    with pytest.raises(DataError, match=r"data.jsonl line 2: sort_digits needs the sorted digits.*'321'"):
        validate_gold([{"task": "sort_digits", "answer": "321", "_where": "data.jsonl line 2"}])


def test_a_stage_asking_a_task_for_what_it_lacks_names_the_key_and_the_tasks_that_have_it():
    from rlhf.pretrain import load_texts

    class Cfg:
        data = data(task="sort_digits")

    with pytest.raises(ConfigError, match=r"data.task='sort_digits'.*no pretraining text.*stage=pretrain.*addition"):
        load_texts(Cfg)
    with pytest.raises(ConfigError, match=r"data.task='sortdigits'.*close: \['sort_digits'\]"):
        load_prompts(data(task="sortdigits"), "train")


@pytest.mark.parametrize("name", TASKS.names())
def test_every_registered_task_produces_rows_of_the_shapes_stages_read(name):
    task, d = TASKS.get(name), data(task=name)
    if task.prompts is not None and name != "code":  # code needs a sandbox: tests/test_sandbox.py
        rows = task.prompts(d, "eval", 3)
        assert len(rows) == 3 and all({"question", "answer", "task", "metadata"} <= set(r) for r in rows)
        validate_gold([r for r in rows if r["answer"] is not None], name)
    if task.pretraining_text is not None:
        assert all(isinstance(t, str) and t for t in task.pretraining_text(4, 0))
    if task.preference_pairs is not None:
        assert all({"prompt", "chosen", "rejected"} <= set(p) for p in task.preference_pairs(4, 0, True))
    assert task.name == name
