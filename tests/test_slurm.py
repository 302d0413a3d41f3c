"""The sbatch scripts on a real one-node Slurm (tools/slurm_local.sh): `sbatch slurm/r1_stage2.sh` (reasoning
RL, 2 tasks: two data-parallel replicas, each generating asynchronously, two steps ahead, on an engine process
of its own) to completion, USR1 → checkpoint → requeue → resume to the same metrics, exit codes reaching
the caller, clear refusals. The stage starts from a short pretrain run in place of a cold-start model."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, cli_env, read_metrics, skip_outside_ci

TINY = [
    "stage.train.steps=6",
    "stage.rl.prompts_per_step=4",
    "rollout.n=4",
    "stage.train.micro_batch_size=4",
    "data.num_eval=4",
    "eval.k=1",
    "reward.workers=1",
    "logger=none",
    "stage.train.save_every=100",
    # Each replica's batches generated ahead are in the checkpoint (rlhf.producer), so the preempted run
    # resumes them instead of generating on the checkpoint's weights what older ones generated.
    "rollout.mode=async",
    "rollout.max_staleness=2",
    "stage.rl.tis_cap=2",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        skip_outside_ci("Slurm is not installed and installing it needs root (tools/slurm_local.sh)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["tools/slurm_local.sh", "start", str(state)], cwd=ROOT, capture_output=True, text=True)
    assert start.returncode == 0, start.stderr
    env = cli_env(SLURM_CONF=str(state / "slurm.conf"), R1_PYTHON=sys.executable)
    yield env
    subprocess.run(["tools/slurm_local.sh", "stop", str(state)], cwd=ROOT, check=True)


def sbatch(env, script, *args, sbatch_opts=("--ntasks-per-node=2",)) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *sbatch_opts, script, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def job_info(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait(env, job: str, timeout: float = 400) -> dict:
    # sbatch --wait polls at 2, 8, 32 s; squeue every 0.5 s is faster.
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still {job_info(env, job).get('JobState')} after {timeout} s; log: {log_of(job)[-3000:]}")


def log_of(job: str, name: str = "r1_stage2") -> str:
    path = ROOT / "slurm" / "logs" / f"{name}-{job}.out"
    return path.read_text() if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def straight(slurm, base, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    job = sbatch(slurm, "slurm/r1_stage2.sh", f"stage.init_from={base}", f"run_dir={run}", *TINY)
    return job, wait(slurm, job), run


def test_sbatch_runs_a_two_task_stage_to_completion(straight):
    job, info, run = straight
    log = log_of(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "srun -n 2 rlhf.train stage=reasoning_rl" in log
    rows = read_metrics(run, drop_wall_clock=True)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 2, 2, 2, 2]  # step j on version max(0, j - 3)
    # stage 2's language reward is scored every step (its values: tests/test_rewards.py)
    assert all(0 <= r["reward/language_consistency"] <= 1 for r in rows)
    assert (run / "checkpoints" / "latest").exists() and (run / "eval.json").exists()


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_metrics(slurm, base, straight, tmp_path):
    run = tmp_path / "preempted"
    job = sbatch(slurm, "slurm/r1_stage2.sh", f"stage.init_from={base}", f"run_dir={run}", *TINY)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    # Async steps do not wait for generation, and the signal takes a few of them to arrive (scancel, the batch
    # shell, srun): it is sent once the first step is logged.
    while not (metrics.exists() and metrics.read_text().splitlines()) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    info = wait(slurm, job)
    log = log_of(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "preempted with a checkpoint: requeueing" in log and "(restart 1)" in log
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert 1 <= stopped < 6  # stopped midway, not at the end
    assert read_metrics(run, drop_wall_clock=True) == read_metrics(straight[2], drop_wall_clock=True)
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight[2] / "eval.json").read_text())
    saved = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "files"
    assert sorted(f.name for f in saved.iterdir()) == ["rollout_buffer.dp0.pkl", "rollout_buffer.dp1.pkl"]


def test_a_failing_job_reports_its_exit_code(slurm, tmp_path):
    """`sbatch --wait` returns the job's exit status: a layout that does not fit the task count stops at
    once, before srun, with the fix."""
    out = subprocess.run(
        ["sbatch", "--wait", "--ntasks-per-node=1", "slurm/r1_stage2.sh", "parallel=tp2", f"run_dir={tmp_path}"],
        cwd=ROOT,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    job = out.stdout.split()[-1]
    log = log_of(job)
    assert "world size 1 is not a multiple of tensor×pipeline×context = 2×1×1" in log
    assert "Fix: change the task count" in log and "srun -n" not in log


def test_scripts_refuse_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for script in sorted((ROOT / "slurm").glob("*.sh")):
        if script.name in ("common.sh", "submit_r1.sh"):  # sourced; run on the login node
            continue
        out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 2 and "runs under Slurm: submit it with 'sbatch" in out.stderr, script.name


def test_the_recipe_driver_chains_the_stages_with_afterok(slurm, tmp_path):
    env = dict(slurm, R1_RUN=str(tmp_path / "r1"), R1_SBATCH="--hold")  # held: nothing runs
    out = subprocess.run(
        ["slurm/submit_r1.sh", str(tmp_path), "logger=none"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ids = dict(pair.split(" ") for pair in out.stdout.strip().split(": ", 1)[1].split(", "))
    try:
        assert job_info(slurm, ids["r1_zero"])["Dependency"] == "(null)"
        needs = {
            "stage1": ["r1_zero"],
            "stage2": ["stage1"],
            "stage3": ["stage2"],
            "rm_helpful": ["stage3"],
            "rm_harmless": ["stage3"],
            "stage4": ["stage3", "rm_helpful", "rm_harmless"],
            "distill": ["stage3"],
            "eval": ["stage4", "distill"],
        }
        for name, after in needs.items():
            info = job_info(slurm, ids[name])
            assert all(f"afterok:{ids[a]}" in info["Dependency"] for a in after), (name, info["Dependency"])
        assert job_info(slurm, ids["stage2"])["Command"].endswith("slurm/r1_stage2.sh")
    finally:
        subprocess.run(["scancel", *ids.values()], env=slurm)
