"""The r1_zero stage end to end through `python -m rlhf.train` with real vLLM: metrics, eval.json, W&B,
report, resume, and the trainer-vs-engine log-prob agreement during training."""

import json
import os
import subprocess
import sys

import pytest

from core.config import ConfigError, compose, validate
from tests.conftest import ROOT

SMALL = ["stage.rl.prompts_per_step=4", "rollout.n=4", "stage.train.micro_batch_size=8", "data.num_eval=8",
         "eval.k=2", "stage.train.save_every=2", "reward.workers=1"]  # fmt: skip
REQUIRED = ["step", "reward/mean", "reward/accuracy", "reward/format", "response_length/mean", "train/loss",
            "train/kl", "train/entropy", "train/clip_frac", "rollout/logprob_diff_mean", "perf/step_s",
            "perf/samples_per_s", "perf/rollout_s", "perf/train_s", "perf/sync_s"]  # fmt: skip


def _train(*overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), R1_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "rlhf.train", *map(str, overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if check and proc.returncode:
        pytest.fail(f"rlhf.train {' '.join(map(str, overrides))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    _train("stage=pretrain", f"run_dir={run}", "stage.train.steps=40", "data.num_train=3000", "data.num_eval=4", "logger=none")
    return run


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_logs_evaluates_and_resumes(base, tmp_path):
    run = tmp_path / "r1"
    _train("stage=r1_zero", f"stage.init_from={base}", f"run_dir={run}", "stage.train.steps=2", "stage.rl.kl_coef=0.001", *SMALL)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if r.get(k) is None]
        assert not missing, missing
        assert r["rollout/logprob_diff_mean"] < 1e-4  # fp32 trainer and engine agree on the sampled tokens
        assert abs(r["rollout/seq_importance_ratio"] - 1) < 1e-3
        assert r["train/kl"] >= 0 and 0 <= r["train/clip_frac"] <= 1
    first = json.loads((run / "eval.json").read_text())
    for split in ("base", "final"):
        assert first[split]["n_prompts"] == 8 and first[split]["k"] == 2 and 0 <= first[split]["pass@1"] <= 1
    assert (run / "wandb_id.txt").exists() and list((run / "wandb").glob("offline-run-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # 2 steps × 2 minibatches

    # Resume: the same command with more steps continues from the checkpoint, keeps the base eval.
    _train("stage=r1_zero", f"stage.init_from={base}", f"run_dir={run}", "stage.train.steps=3", "stage.rl.kl_coef=0.001", *SMALL)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    again = json.loads((run / "eval.json").read_text())
    assert again["base"] == first["base"]

    report = subprocess.run([sys.executable, "-m", "tools.report", f"run_dir={run}"], cwd=ROOT, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    html = (run / "report.html").read_text()
    for plot in ("reward", "response_length", "kl", "entropy"):
        assert plot in html


def test_dynamic_sampling_and_variants_run(base, tmp_path):
    """DAPO-style switches together: clip-higher, token-mean loss, dynamic sampling, overlong penalty, TIS."""
    run = tmp_path / "dapo"
    _train("stage=r1_zero", f"stage.init_from={base}", f"run_dir={run}", "stage.train.steps=2", *SMALL,
           "stage.rl.kl_coef=0", "stage.rl.clip_eps_high=0.28", "stage.rl.loss_agg=token_mean", "stage.rl.dynamic_sampling=true",
           "stage.rl.overlong_buffer=8", "stage.rl.tis_cap=2.0", "stage.rl.advantage=dr_grpo")  # fmt: skip
    rows = _rows(run)
    assert len(rows) == 2 and all(r["train/kl"] is None for r in rows)  # no reference model with β=0
    assert all(r["rollout/prompts"] >= 4 for r in rows)


def test_rl_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="rollout.n"):
        validate(compose(["stage=r1_zero", "rollout.n=1"]), 1)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        validate(compose(["stage=r1_zero", "stage.train.micro_batch_size=48"]), 1)
    with pytest.raises(ConfigError, match="prompts_per_step"):
        validate(compose(["stage=r1_zero", "stage.rl.prompts_per_step=3", "stage.train.micro_batch_size=4",
                          "stage.train.global_batch_size=8"]), 2)  # fmt: skip
    with pytest.raises(ConfigError, match="max_new_tokens"):
        validate(compose(["stage=r1_zero", "rollout.max_new_tokens=64"]), 1)


def test_a_data_file_without_an_answer_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    proc = _train("stage=r1_zero", "data=jsonl", f"data.train_path={bad}", f"data.eval_path={bad}", f"run_dir={tmp_path}/x",
                  "logger=none", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "bad.jsonl line 2" in proc.stderr and "answer" in proc.stderr
