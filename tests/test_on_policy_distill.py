"""stage=on_policy_distill: a student trained on its own samples with the teacher's per-token log-probs as
advantages moves towards the teacher (the reverse KL falls), and a teacher of the wrong kind is refused."""

import json

import pytest

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate
from tests.conftest import train_cli

STUDENT = [
    "stage=on_policy_distill",
    "model=tiny_student",
    "stage.train.steps=14",  # the last three KL values at 0.61-0.69 of the first over seeds 2 and 3
    "stage.train.optim.lr=1e-3",
    "stage.train.optim.min_lr=1e-3",
    "data.num_train=600",
    "data.num_eval=16",
    "eval.k=2",
    "logger=none",
]


def test_student_approaches_the_teacher(base, tmp_path):
    run = tmp_path / "student"
    train_cli(*STUDENT, f"stage.rl.teacher={base}", f"run_dir={run}")
    kl = [json.loads(x)["distill/reverse_kl"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(kl) == 14 and kl[0] > 0.5
    assert sum(kl[-3:]) / 3 < 0.8 * kl[0], kl  # towards tiny_dense's distribution, from a random student


def test_the_teacher_is_a_language_model_of_this_stage_only(base, tmp_path):
    with pytest.raises(ConfigError, match="stage.rl.teacher"):
        validate(compose(["stage=on_policy_distill"]), 1)
    with pytest.raises(ConfigError, match="stage.rl.teacher"):
        validate(compose(["stage=r1_zero", f"stage.rl.teacher={base}"]), 1)
    rm = tmp_path / "rm"
    train_cli(
        "stage=reward_model",
        f"stage.init_from={base}",
        "data=preference_harmless",
        "stage.train.steps=2",
        f"run_dir={rm}",
        "logger=none",
    )
    out = train_cli(*STUDENT, f"stage.rl.teacher={rm}", f"run_dir={tmp_path / 'x'}", check=False)
    assert out.returncode == 2 and "stage.rl.teacher" in out.stderr and "not a language model" in out.stderr
