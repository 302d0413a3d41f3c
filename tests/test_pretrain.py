"""The addition task and the pretrain stage run end to end through `python -m rlhf.train`."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from rlhf.tasks import addition as A
from tests.conftest import assert_time_ledger

ROOT = Path(__file__).resolve().parents[1]


def test_held_out_split_is_stable_and_about_ten_percent():
    pairs = [(a, b) for a in range(0, 1000, 3) for b in range(0, 1000, 7)]
    share = sum(A.is_held_out(a, b) for a, b in pairs) / len(pairs)
    assert 0.09 < share < 0.11
    assert [A.is_held_out(a, b) for a, b in pairs[:500]] == [A.is_held_out(a, b) for a, b in pairs[:500]]
    assert all(A.is_held_out(*map(int, re.findall(r"\d+", r["prompt"]))) for r in A.eval_prompts(50, seed=3))
    assert A.eval_prompts(20, seed=1) == A.eval_prompts(20, seed=1)


def test_prompt_and_trace_format():
    assert A.make_prompt(385, 47) == "User: 385+047 Assistant: <think>"
    assert A.trace(385, 47) == "5+7+0=12;8+4+1=13;3+0+1=04</think><answer>432</answer>"
    assert A.trace(999, 999) == "9+9+0=18;9+9+1=19;9+9+1=19</think><answer>1998</answer>"
    assert A.trace(3, 4) == "3+4+0=07;0+0+0=00;0+0+0=00</think><answer>7</answer>"


def _check_trace(a, b):
    steps, answer = re.fullmatch(r"(.*)</think><answer>(\d+)</answer>", A.trace(a, b)).groups()
    assert answer == A.gold(a, b) == str(a + b)
    carry, digits = 0, []
    for step, x, y in zip(steps.split(";"), f"{a:03d}"[::-1], f"{b:03d}"[::-1]):
        lhs, rhs = step.split("=")
        assert lhs == f"{x}+{y}+{carry}" and int(rhs) == int(x) + int(y) + carry and len(rhs) == 2
        carry, digits = int(rhs[0]), [rhs[1], *digits]
    assert int(str(carry) + "".join(digits)) == a + b


def test_trace_is_correct_for_random_pairs_with_carries():
    rng = random.Random(0)
    pairs = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(500)]
    for a, b in [(999, 1), (500, 500), (0, 0), (1, 999), (99, 901), *pairs]:
        _check_trace(a, b)


def test_score():
    assert A.score("5+7+0=12</think><answer>432</answer>", "432") == 1.0
    assert A.score("</think><answer>432</answer>junk<answer>1</answer>", "432") == 1.0  # the first tag counts
    assert A.score("</think><answer>431</answer>", "432") == 0.0
    assert A.score("</think><answer>1</answer><answer>432</answer>", "432") == 0.0
    assert A.score("</think>432", "432") == 0.0
    assert A.score("</think><answer>432", "432") == 0.0
    assert A.score("<answer> 432</answer>", "432") == 0.0
    assert A.score("", "432") == 0.0
    assert A.score("%$#<answer><answer>", "432") == 0.0


def test_pretraining_text_mix_avoids_held_out_pairs():
    texts = A.pretraining_text(random.Random(0), 4000)
    assert all(t.startswith("User: ") for t in texts)
    pairs = [tuple(map(int, re.match(r"User: (\d{3})\+(\d{3})", t).groups())) for t in texts]
    assert not any(A.is_held_out(a, b) for a, b in pairs)
    completions = [t.split("<think>", 1)[1] for t in texts]
    bare = sum(c.startswith("</think><answer>") and c.endswith("</answer>") for c in completions) / len(texts)
    correct = sum(c == A.trace(a, b) for c, (a, b) in zip(completions, pairs)) / len(texts)
    assert 0.50 < bare < 0.60 and 0.09 < correct < 0.15
    assert 0.3 < sum(map(A.starts_with_trace, completions)) / len(texts) < 0.5


def _train(run_dir, *overrides, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1_NO_PROGRESS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rlhf.train",
        "stage=pretrain",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=.hydra",
        "logger=none",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


SMALL = [
    "stage.train.global_batch_size=8",
    "stage.train.micro_batch_size=4",
    "stage.train.save_every=5",
    "data.num_train=500",
    "data.num_eval=8",
]


def test_pretrain_runs_logs_checkpoints_and_resumes(tmp_path):
    _train(tmp_path, *SMALL, "stage.train.steps=10")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    _train(tmp_path, *SMALL, "stage.train.steps=20")  # same run dir: picks up at step 10

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    keys = {"step", "train/loss", "train/grad_norm", "train/lr", "perf/step_s", "perf/tokens_per_s"}
    assert all(keys <= r.keys() for r in rows)
    assert_time_ledger(rows, min_covered=0.9)  # steps of milliseconds: a little loop overhead shows
    assert [r["step"] for r in rows if r["time/checkpoint_s"] > 0] == [6, 16]  # saves after steps 5 and 15
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0
    assert (tmp_path / "checkpoints" / "step_00000020").is_dir()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert not (ROOT / "outputs").exists() or not any((ROOT / "outputs").iterdir())
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 20 and summary["eval/n"] == 8
    assert 0.0 <= summary["eval/pass@1_greedy"] <= 1.0 and 0.0 <= summary["eval/reasoning_first_sampled"] <= 1.0


def test_unknown_override_key_exits_2(tmp_path):
    out = _train(tmp_path, "stage.train.stepz=3", check=False)
    assert out.returncode == 2
    assert "unknown config key 'stage.train.stepz'" in out.stderr


def test_batches_are_a_function_of_seed_and_step():
    from rlhf.trainer import batch_rows

    assert batch_rows(7, 0, 50, 8) == batch_rows(7, 0, 50, 8) != batch_rows(7, 1, 50, 8)
    epoch = [i for s in range(5) for i in batch_rows(s, 0, 40, 8)]  # 5 steps × 8 rows = one epoch
    assert sorted(epoch) == list(range(40))
