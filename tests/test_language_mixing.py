"""R1 stage 2's language-consistency reward on the bilingual setup (rlhf/tasks/bilingual.py): from a base
that mixes English and Spanish within its reasoning, GRPO with the reward makes the reasoning English, and
the same GRPO without it does not. A learning comparison (about 5 minutes): `make learning` runs it, `make test`
does not; the reward's wiring into a reasoning_rl run is checked by test_slurm's stage-2 job."""

import json

import pytest

from tests.conftest import train_cli

COMMON = ["data=bilingual", "rollout.max_new_tokens=40", "data.num_eval=50", "logger=none"]
RL = [*COMMON, "stage.train.steps=20", "data.num_train=2000"]


@pytest.fixture(scope="module")
def mixing_base(tmp_path_factory):
    run = tmp_path_factory.mktemp("bilingual")
    train_cli("stage=pretrain", *COMMON, "stage.train.steps=300", "data.num_train=20000", f"run_dir={run}")
    return run


def _final(run) -> tuple[dict, dict]:
    evals = json.loads((run / "eval.json").read_text())
    return evals["base"], evals["final"]


@pytest.mark.learning
def test_language_consistency_reward_unmixes_the_reasoning(mixing_base, tmp_path):
    with_lc, without = tmp_path / "with", tmp_path / "without"
    train_cli("stage=reasoning_rl", *RL, f"stage.init_from={mixing_base}", f"run_dir={with_lc}")
    train_cli("stage=r1_zero", *RL, f"stage.init_from={mixing_base}", f"run_dir={without}")
    base, lc = _final(with_lc)
    _, plain = _final(without)
    assert base["language_consistency"] < 0.75  # the base mixes
    assert lc["language_consistency"] >= base["language_consistency"] + 0.15, (base, lc)
    assert lc["language_consistency"] >= plain["language_consistency"] + 0.1, (plain, lc)
