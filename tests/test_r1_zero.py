"""The r1_zero stage end to end through `python -m rlhf.train` with real vLLM: metrics, eval.json, W&B,
report, resume, and the trainer-vs-engine log-prob agreement during training."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from core.compose import compose
from core.data import shuffled_rows
from core.errors import ConfigError
from core.validate import validate
from tests.conftest import ROOT, assert_time_ledger, cli_env, read_metrics
from tests.conftest import train_cli as _train

SMALL = [
    "stage.rl.prompts_per_step=4",
    "rollout.n=4",
    "stage.train.micro_batch_size=8",
    "data.num_eval=8",
    "eval.k=2",
    "stage.train.save_every=2",
    "reward.workers=1",
]
REQUIRED = [
    "step",
    "reward/mean",
    "reward/accuracy",
    "reward/format",
    "response_length/mean",
    "train/loss",
    "train/kl",
    "train/entropy",
    "train/clip_frac",
    "rollout/logprob_diff_mean",
    "consistency/kl_mean",
    "consistency/tv_max",
    "consistency/kl_late",
    "perf/step_s",
    "perf/samples_per_s",
    "perf/rollout_s",
    "perf/train_s",
    "sync/seconds",
    "sync/mb",
]

GROUPS = {"reward", "response_length", "rollout", "consistency", "train", "perf", "sync", "time"}


# The mismatch oracle over the whole (128-token) vocabulary, with a bound the run must hold: the engine
# serves the trainer's weights in fp32 (rlhf.consistency; ~4e-7 measured per token).
ORACLE = ["rollout.consistency=topk", "rollout.consistency_topk=-1", "rollout.consistency_max_kl=1e-5"]


def test_grpo_runs_logs_evaluates_and_resumes(base, tmp_path):
    run = tmp_path / "r1"
    _train(
        "stage=r1_zero",
        f"stage.init_from={base}",
        f"run_dir={run}",
        "stage.train.steps=2",
        "stage.rl.kl_coef=0.001",
        *SMALL,
        *ORACLE,
    )
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if r.get(k) is None]
        assert not missing, missing
        assert {k.split("/")[0] for k in r if k != "step"} <= GROUPS  # the W&B dashboard's sections
        assert r["rollout/logprob_diff_mean"] < 1e-4  # fp32 trainer and engine agree on the sampled tokens
        assert abs(r["consistency/kl_mean"]) < 1e-5 and r["consistency/tv_max"] < 1e-4  # and on the distributions
        assert abs(r["rollout/seq_importance_ratio"] - 1) < 1e-3
        assert r["sync/probe_gap"] < 1e-4 and r["sync/version"] == r["step"]  # the engine serves what was sent
        # k3 is >= 0 exactly; in fp32, exp(x) next to 1 rounds by ~6e-8, so a mean over tokens whose policy
        # equals the reference can come out a hair below 0 (-2.2e-10 seen)
        assert r["train/kl"] >= -1e-8 and 0 <= r["train/clip_frac"] <= 1
    assert_time_ledger(rows)
    # The first window holds the base model's evaluation; two minibatches need the old log-probs' own pass.
    assert rows[0]["time/eval_s"] > 0 and rows[1]["time/eval_s"] == 0
    assert all(r["time/generation_s"] > 0 and r["time/update_s"] > 0 and r["time/sync_export_s"] > 0 for r in rows)
    assert all(r["time/logprobs_ref_s"] > 0 and r["time/logprobs_old_s"] > 0 for r in rows)
    first = json.loads((run / "eval.json").read_text())
    for split in ("base", "final"):
        assert first[split]["n_prompts"] == 8 and first[split]["k"] == 2 and 0 <= first[split]["pass@1"] <= 1
    assert (run / "wandb_id.txt").exists() and list((run / "wandb").glob("offline-run-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # 2 steps × 2 minibatches

    # Resume: the same command with more steps continues from the checkpoint, keeps the base eval.
    _train(
        "stage=r1_zero",
        f"stage.init_from={base}",
        f"run_dir={run}",
        "stage.train.steps=3",
        "stage.rl.kl_coef=0.001",
        *SMALL,
        *ORACLE,
    )
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    again = json.loads((run / "eval.json").read_text())
    assert again["base"] == first["base"]

    report = subprocess.run(
        [sys.executable, "-m", "tools.report", f"run_dir={run}"], cwd=ROOT, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    html = (run / "report.html").read_text()
    for plot in ("reward", "response_length", "kl", "entropy", "step_time"):
        assert plot in html
    assert "report/consistency.png" in html  # the oracle's plot


def test_dynamic_sampling_and_variants_run(base, tmp_path):
    """DAPO-style switches together: clip-higher, token-mean loss, dynamic sampling, overlong penalty, TIS."""
    run = tmp_path / "dapo"
    _train(
        "stage=r1_zero",
        f"stage.init_from={base}",
        f"run_dir={run}",
        "stage.train.steps=2",
        *[a for a in SMALL if not a.startswith("stage.train.save_every")],
        "stage.train.save_every=1",
        "stage.rl.kl_coef=0",
        "stage.rl.clip_eps_high=0.28",
        "stage.rl.loss_agg=token_mean",
        "stage.rl.dynamic_sampling=true",
        "stage.rl.overlong_buffer=8",
        "stage.rl.tis_cap=2.0",
        "stage.rl.advantage=dr_grpo",
        "rollout.consistency=off",
    )
    rows = read_metrics(run)
    assert len(rows) == 2 and all(r["train/kl"] is None for r in rows)  # no reference model with β=0
    assert not any(k.startswith("consistency/") or k.startswith("rollout/logprob_diff") for k in rows[0])
    for r in rows:  # 4 prompts, then up to 3 refills of 4 while fewer than 4 groups differ in reward
        assert r["rollout/prompts"] in (4, 8, 12, 16)
        assert r["rollout/informative_frac"] == 1 or r["rollout/prompts"] == 16  # topped up only once refills ran out
    assert_time_ledger(rows)
    assert rows[0]["time/checkpoint_s"] == 0 < rows[1]["time/checkpoint_s"]  # step 1's save, after its row
    assert all(r["time/logprobs_old_s"] > 0 == r["time/logprobs_ref_s"] for r in rows)  # β=0: no reference


def test_rl_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="rollout.n"):
        validate(compose(["stage=r1_zero", "rollout.n=1"]), 1)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        validate(compose(["stage=r1_zero", "stage.train.micro_batch_size=48"]), 1)
    with pytest.raises(ConfigError, match="prompts_per_step"):
        validate(
            compose(
                [
                    "stage=r1_zero",
                    "stage.rl.prompts_per_step=3",
                    "stage.train.micro_batch_size=4",
                    "stage.train.global_batch_size=8",
                ]
            ),
            2,
        )
    with pytest.raises(ConfigError, match="max_new_tokens"):
        validate(compose(["stage=r1_zero", "rollout.max_new_tokens=64"]), 1)
    with pytest.raises(ConfigError, match="stage.train.micro_batch_tokens=32 < stage.train.seq_length"):
        validate(compose(["stage=r1_zero", "stage.train.micro_batch_tokens=32"]), 1)
    with pytest.raises(ConfigError, match=r"rollout.min_new_tokens=99 must be in \[0, rollout.max_new_tokens"):
        validate(compose(["stage=r1_zero", "rollout.min_new_tokens=99"]), 1)
    with pytest.raises(ConfigError, match="rollout.consistency='kl'"):
        validate(compose(["stage=r1_zero", "rollout.consistency=kl"]), 1)
    with pytest.raises(ConfigError, match="rollout.consistency_topk=-1 asks the engine for all 151936"):
        validate(
            compose(
                ["stage=r1_zero", "rollout.consistency=topk", "rollout.consistency_topk=-1", "model.vocab_size=151936"]
            ),
            1,
        )
    with pytest.raises(ConfigError, match="rollout.consistency_max_kl=0.1 with rollout.consistency=sampled"):
        validate(compose(["stage=r1_zero", "rollout.consistency_max_kl=0.1"]), 1)
    # A token budget fills micro-batches by length: micro_batch_size no longer has to divide the update
    validate(compose(["stage=r1_zero", "stage.train.micro_batch_size=128", "stage.train.micro_batch_tokens=4096"]), 1)


def test_a_data_file_without_an_answer_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    proc = _train(
        "stage=r1_zero",
        "data=jsonl",
        f"data.train_path={bad}",
        f"data.eval_path={bad}",
        f"run_dir={tmp_path}/x",
        "logger=none",
        check=False,
    )
    assert proc.returncode == 2
    assert "bad.jsonl line 2" in proc.stderr and "answer" in proc.stderr


def _start_killable(cmd, log):
    with open(log, "w") as out:  # not a pipe: an orphan holding it open would block the reader
        return subprocess.Popen(
            cmd, cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_group(proc):
    """SIGKILL the run and whatever it started: megatron's checkpoint writer keeps a multiprocessing
    Manager process that outlives a killed parent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_at_three_points_resumes_an_async_run_to_the_same_metrics(base, tmp_path):
    """An async run (rollouts generated two steps ahead by an engine process, each step's generation
    interrupted by the next weights and continued on them: rlhf.producer, rlhf.partial): the same command
    after each SIGKILL (mid-step, inside a checkpoint save, between the step dir's rename and the `latest`
    pointer) must end with exactly the metrics (sampled tokens' hashes, prompts) and evaluations of an
    uninterrupted run, every prompt of the stream trained once, in order. Every checkpoint holds an
    interrupted step's prefix, so each resume continues one."""
    args = [
        "stage=r1_zero",
        f"stage.init_from={base}",
        "stage.train.steps=6",
        "stage.train.save_every=1",
        "stage.rl.kl_coef=0.001",
        "rollout.mode=async",
        "rollout.max_staleness=2",
        "rollout.partial=true",  # each step's generation interrupted after 8 tokens by the next weights
        "rollout.partial_tokens=8",
        "stage.rl.tis_cap=2",
        "data.num_train=64",
        *SMALL[:3],
        "data.num_eval=4",
        "eval.k=1",
        "reward.workers=1",
        "logger=none",
    ]
    straight = tmp_path / "straight"
    _train(*args, f"run_dir={straight}")

    run = tmp_path / "killed"
    proc = _start_killable([sys.executable, "-m", "rlhf.train", *args, f"run_dir={run}"], tmp_path / "kill1.log")
    metrics = run / "metrics.jsonl"
    rows_written = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    while proc.poll() is None and rows_written() < 2:
        time.sleep(0.05)
    _kill_group(proc)  # mid-step 3: steps 1-2 are checkpointed, step 3's work is lost
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = [r["step"] for r in read_metrics(run)]
    # Policy steps count optimizer updates: rollout step k ends at policy step 2k (2 minibatches).
    for point, policy_step in (("shards", 8), ("pointer", 10)):
        log = tmp_path / f"{point}.log"
        crash = _start_killable(
            [sys.executable, "tests/dist/crash_run.py", point, str(policy_step), *args, f"run_dir={run}"], log
        )
        crash.wait(timeout=600)
        _kill_group(crash)
        assert crash.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"  # the interrupted save left 8
    assert list((run / "checkpoints").glob(".tmp.step_00000008")) == []  # … and 10 is complete but not pointed at
    # The engine process killed once step 5 is checkpointed: the trainer stops with the engine's clear error
    # (no restart in these modes); the checkpoints it wrote keep their buffers.
    log = tmp_path / "engine_killed.log"
    proc = _start_killable([sys.executable, "-m", "rlhf.train", *args, f"run_dir={run}"], log)
    while proc.poll() is None and (run / "checkpoints" / "latest").read_text().strip() != "step_00000010":
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()):
            child.kill()
    assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    assert "its engine-core process exited" in log.read_text()
    _kill_group(proc)
    _train(*args, f"run_dir={run}")
    assert len(killed_at) >= 2
    rows = read_metrics(run, drop_wall_clock=True)
    assert rows == read_metrics(straight, drop_wall_clock=True)
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 2, 2, 2, 2]  # step j: weights of max(0, j - 3)
    assert all(r["rollout/continued"] > 0 for r in rows[3:])  # … finished on those of j - 2
    assert all(r["rollout/token_staleness_mean"] < 2 for r in rows[3:])
    drawn = [i for r in rows for i in r["rollout/prompt_ids"]]
    assert drawn == shuffled_rows(0, len(drawn), 0, 64)  # nothing skipped, nothing twice
