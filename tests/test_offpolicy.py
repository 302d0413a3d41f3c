"""rollout.mode (rlhf.producer): one_step_off and async generate ahead of the trainer on an engine process
of their own, on a schedule fixed by the step, also for a tensor-parallel trainer; what they refuse at
start-up. The async run's kill -9 resume is tests/test_r1_zero.py's, two replicas' Slurm preemption resume
tests/test_slurm.py's; the planner's one-step-off rows are tests/test_plan.py's."""

import json
import sys

import pytest

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate
from tests.conftest import assert_time_ledger, read_metrics, run_worker, train_cli

OFF = ["stage=r1_zero", "rollout.mode=one_step_off", "stage.rl.tis_cap=2"]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["rollout.mode=later"], 1, r"rollout.mode='later': expected one of sync, one_step_off, async"),
        (["rollout.mode=async", "rollout.max_staleness=-1", "stage.rl.tis_cap=2"], 1, "rollout.max_staleness=-1"),
        (["rollout=hf"], 1, "rollout.mode=one_step_off with rollout.engine=hf"),
        (["stage.rl.tis_cap=0"], 1, "stage.rl.tis_cap=0 leaves that uncorrected"),
        (["stage.rl.dynamic_sampling=true"], 2, "dynamic_sampling=true and 2 data-parallel replicas"),
        (["parallel.context=2"], 2, "rollout.mode=one_step_off with parallel.context=2"),
        (["stage=general_rl", "parallel=tp2"], 2, "with reward.models and parallel.tensor=2, pipeline=1"),
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


ONE_STEP_OFF = [
    *OFF,
    "stage.train.steps=3",
    "stage.rl.prompts_per_step=4",
    "rollout.n=4",
    "stage.train.micro_batch_size=8",
    "stage.rl.overlong_buffer=60",  # rewards that differ within a group (by length), so every update moves
    "data.num_eval=4",
    "eval.k=1",
    "reward.workers=1",
    "logger=none",
]


@pytest.fixture(scope="module")
def one_step_off(base, tmp_path_factory):
    """The same one_step_off run in one process and with two tensor-parallel ranks (run dirs)."""
    one, tp2 = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("tp2")
    train_cli(*ONE_STEP_OFF, f"stage.init_from={base}", f"run_dir={one}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port", "29671", "--nproc-per-node", "2"]
    run_worker(
        [*torchrun, "-m", "rlhf.train", *ONE_STEP_OFF, f"stage.init_from={base}", f"run_dir={tp2}", "parallel=tp2"]
    )
    return one, tp2


def test_one_step_off_trains_on_samples_one_version_old(one_step_off):
    """Step 1 trains on the start-up weights' samples; every later step on those of the weights one step
    older than its own (step k: version k - 2). The trainer's wait for rollouts is the ledger's generation
    phase, and the ledger still covers the step."""
    run = one_step_off[0]
    rows = read_metrics(run)
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1]
    assert [r["rollout/staleness_1"] for r in rows] == [0, 16, 16]  # every sample, not some
    assert_time_ledger(rows)
    for r in rows:
        assert r["time/generation_wait_s"] == r["time/generation_s"] and r["perf/engine_busy_s"] > 0
        assert r["time/reward_s"] == 0  # scored on the producer's thread, within what the trainer waited for
        assert r["train/grad_norm"] > 0  # the updates move the weights that generate step 3's samples
    assert "final" in json.loads((run / "eval.json").read_text())


def test_a_tensor_parallel_trainer_takes_its_engine_ranks_rollouts(one_step_off):
    """With two tensor-parallel ranks only the first drives the engine; its producer thread generates and
    scores alone and hands each batch to its peer. The run equals the one-process run: the same samples
    (step 3's from weights the TP2 update wrote), losses and evaluation."""
    one, tp2 = (read_metrics(run) for run in one_step_off)
    for key in ("rollout/tokens_sha256", "rollout/prompt_ids", "rollout/staleness_max", "reward/mean"):
        assert [r[key] for r in tp2] == [r[key] for r in one], key
    for key in ("train/loss", "train/grad_norm"):
        assert [r[key] for r in tp2] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
    final = [json.loads((run / "eval.json").read_text())["final"] for run in one_step_off]
    assert final[1] == final[0]


@pytest.mark.parametrize("names", [["rollout_buffer.dp0.pkl", "rollout_buffer.dp1.pkl"], ["rollout_buffer.pkl"]])
def test_a_resume_with_other_replicas_than_the_buffers_is_refused(P, tmp_path, names):
    """Two replicas' buffers (or one written under another name) resumed by one process: refused, not read
    as if nothing had been generated ahead (which would skip those batches' prompts)."""
    from rlhf.producer import _read_buffer

    (tmp_path / "files").mkdir()
    for name in names:
        (tmp_path / "files" / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"this run with 1 model replicas \(parallel.data\) resumes rollout_buffer"):
        _read_buffer(str(tmp_path))
