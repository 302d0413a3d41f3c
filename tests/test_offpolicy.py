"""rollout.mode (rlhf.producer): one_step_off and async generate ahead of the trainer on an engine process
of their own, on a schedule fixed by the step; what they refuse at start-up. The async run's kill -9 resume
is tests/test_r1_zero.py's; the planner's one-step-off rows are tests/test_plan.py's."""

import json

import pytest

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate
from tests.conftest import assert_time_ledger, read_metrics, train_cli

OFF = ["stage=r1_zero", "rollout.mode=one_step_off", "stage.rl.tis_cap=2"]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["rollout.mode=later"], 1, r"rollout.mode='later': expected one of sync, one_step_off, async"),
        (["rollout.mode=async", "rollout.max_staleness=-1", "stage.rl.tis_cap=2"], 1, "rollout.max_staleness=-1"),
        (["rollout=hf"], 1, "rollout.mode=one_step_off with rollout.engine=hf"),
        (["stage.rl.tis_cap=0"], 1, "stage.rl.tis_cap=0 leaves that uncorrected"),
        ([], 2, r"rollout.mode=one_step_off with 2 trainer processes \(parallel.tensor=1, pipeline=1, data=2\)"),
        (["rollout.mode=sync", "rollout.partial=true"], 1, r"rollout.partial=true with rollout.mode=sync \(lead 0\)"),
        (["rollout.partial=true", "rollout.partial_tokens=64"], 1, "rollout.partial_tokens=64 with rollout.max_new"),
    ],
)
def test_off_policy_settings_are_refused_naming_the_field(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([*OFF, *overrides]), world)


def test_sync_and_a_zero_lag_async_lead_no_steps():
    assert compose(["stage=r1_zero"]).rollout.lead == 0
    assert compose(OFF).rollout.lead == 1
    assert compose(["stage=r1_zero", "rollout.mode=async", "rollout.max_staleness=3"]).rollout.lead == 3


def test_one_step_off_trains_on_samples_one_version_old(base, tmp_path):
    """Step 1 trains on the start-up weights' samples; every later step on those of the weights one step
    older than its own (step k: version k - 2). The trainer's wait for rollouts is the ledger's generation
    phase, and the ledger still covers the step."""
    run = tmp_path / "run"
    train_cli(
        *OFF,
        f"stage.init_from={base}",
        f"run_dir={run}",
        "stage.train.steps=3",
        "stage.rl.prompts_per_step=4",
        "rollout.n=4",
        "stage.train.micro_batch_size=8",
        "data.num_eval=4",
        "eval.k=1",
        "reward.workers=1",
        "logger=none",
    )
    rows = read_metrics(run)
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1]
    assert [r["rollout/staleness_1"] for r in rows] == [0, 16, 16]  # every sample, not some
    assert_time_ledger(rows)
    for r in rows:
        assert r["time/generation_wait_s"] == r["time/generation_s"] and r["perf/engine_busy_s"] > 0
        assert r["time/reward_s"] == 0  # scored on the producer's thread, within what the trainer waited for
    assert "final" in json.loads((run / "eval.json").read_text())
