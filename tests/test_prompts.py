import json
import re

import pytest

from core.compose import compose
from core.config import DataConfig
from core.data import DataError
from core.errors import ConfigError
from rlhf.prompts import R1_ZERO_TEMPLATE, fill, load_prompts
from rlhf.rewards import REWARDS
from rlhf.tasks import addition, gym


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"name": "t", "num_train": 40, "num_eval": 10, **kw})


def test_r1_zero_template_is_the_papers_and_ends_inside_think():
    assert R1_ZERO_TEMPLATE.startswith("A conversation between User and Assistant. The user asks a question")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_ZERO_TEMPLATE
    assert fill("r1_zero", " What is 2+3? \n").endswith("User: What is 2+3?. Assistant: <think>")
    assert fill("r1_zero", "Calculate 5 - 3.").endswith("User: Calculate 5 - 3. Assistant: <think>")
    assert fill("none", "as is\n") == "as is\n"


def test_addition_keeps_its_compact_prompt_and_holds_out_eval_pairs():
    train = load_prompts(cfg(task="addition", num_train=500, num_eval=50), "train")
    evals = load_prompts(cfg(task="addition", num_train=500, num_eval=50), "eval")
    assert len(train) == 500 and len(evals) == 50
    pairs = lambda rows: {tuple(map(int, re.findall(r"\d+", r["prompt"]))) for r in rows}  # noqa: E731
    assert not any(addition.is_held_out(*p) for p in pairs(train))
    assert all(addition.is_held_out(*p) for p in pairs(evals))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    a, b = pairs(train[:1]).pop()
    assert train[0] == {
        "prompt": addition.make_prompt(a, b),
        "answer": str(a + b),
        "task": "addition",
        "metadata": {"language": "en", "answer_style": "tag"},
    }
    r1 = load_prompts(cfg(task="addition", template="r1_zero"), "train")[0]
    assert r1["prompt"].endswith(f"User: {a:03d}+{b:03d}. Assistant: <think>")


def test_countdown_train_and_eval_are_disjoint_and_scorable():
    c = cfg(task="countdown", num_train=20, num_eval=8, seed=5)
    train, evals = load_prompts(c, "train"), load_prompts(c, "eval")
    assert len(train) == 20 and len(evals) == 8
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    row = evals[0]
    assert row["task"] == "rg/countdown" and row["prompt"].startswith(R1_ZERO_TEMPLATE[:40])
    assert row["metadata"]["entry"]["question"].strip().removesuffix(".") in row["prompt"]
    assert REWARDS["accuracy"](f"r</think><answer>{row['answer']}</answer>", row) == 1.0
    assert load_prompts(c, "eval") == evals  # deterministic


def test_eval_drops_questions_seen_in_train(monkeypatch):
    # reasoning-gym seeds item i with seed + i: an offset of 1 replays the train items, which must go.
    monkeypatch.setattr(gym, "EVAL_SEED_OFFSET", 1)
    c = cfg(task="basic_arithmetic", num_train=20, num_eval=8)
    train, evals = load_prompts(c, "train"), load_prompts(c, "eval")
    assert len(evals) == 8 and not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    with pytest.raises(ConfigError, match=r"too few distinct questions .*data.num_eval=10"):
        load_prompts(cfg(task="basic_arithmetic", num_train=100, num_eval=10), "eval")


def write_jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if r is not None else "") + "\n" for r in rows))
    return str(path)


def test_jsonl_rows_are_templated_validated_and_located(tmp_path):
    rows = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "id": i} for i in range(6)]
    rows[1]["task"] = "addition"
    path = write_jsonl(tmp_path / "d.jsonl", rows[:2] + [None] + rows[2:])  # a blank line 3
    train, evals = (
        load_prompts(cfg(source="jsonl", train_path=path, num_eval=2), "train"),
        load_prompts(cfg(source="jsonl", train_path=path, num_eval=2), "eval"),
    )
    assert [r["metadata"]["id"] for r in train] == [0, 1, 2, 3] and [r["metadata"]["id"] for r in evals] == [4, 5]
    assert [r["_where"] for r in evals] == [f"{path} line 6", f"{path} line 7"]
    assert [r["task"] for r in train[:3]] == ["math", "addition", "math"]
    assert train[0]["prompt"].endswith("User: What is 0+0?. Assistant: <think>")
    assert len(load_prompts(cfg(source="jsonl", train_path=path, num_train=2, num_eval=2), "train")) == 2
    other = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "answer": "7", "task": "math"}])
    assert [r["answer"] for r in load_prompts(cfg(source="jsonl", train_path=path, eval_path=other), "eval")] == ["7"]


def test_jsonl_errors_name_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "answer": "1"}, None, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"a.jsonl line 3: missing .* 'answer'"):
        load_prompts(cfg(source="jsonl", train_path=bad, num_eval=0), "train")
    gold = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": "\\frac{1}{"}])
    with pytest.raises(DataError, match=r"g.jsonl line 2: math-verify cannot parse"):
        load_prompts(cfg(source="jsonl", train_path=gold, num_eval=0), "train")
    with pytest.raises(DataError, match=r"leaves none to train on.*data.eval_path"):
        load_prompts(cfg(source="jsonl", train_path=gold, num_eval=2), "eval")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(task="addition", template="chatml"), r"data.template='chatml'"),
        (dict(task="chess"), r"data.task='chess'.*countdown"),
        (dict(source="csv"), r"data.source='csv'"),
        (dict(source="jsonl"), r"data.train_path"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        load_prompts(cfg(**kw), "train")


@pytest.mark.parametrize("preset", ["countdown", "basic_arithmetic", "gsm_symbolic"])
def test_presets_compose(preset):
    d = compose([f"data={preset}"]).data
    assert (d.name, d.source, d.task, d.template) == (preset, "generated", preset, "auto")
    assert load_prompts(DataConfig(**{**vars(d), "num_train": 2, "num_eval": 1}), "eval")[0]["task"] == f"rg/{preset}"
