"""Hydra sweeps through hydra-submitit-launcher: `-m` with the local launcher fans out as processes, each
job in its own run_dir (the Slurm launcher shares the config; tests/test_slurm.py covers Slurm itself)."""

import json
import subprocess
import sys

from tests.conftest import ROOT, cli_env


def test_multirun_fans_out_one_run_dir_per_point(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf.train",
            "-m",
            "hydra/launcher=local",
            "stage=pretrain",
            "stage.train.steps=3",
            "stage.train.optim.lr=1e-3,2e-3",
            "data.num_train=300",
            "data.num_eval=2",
            "logger=none",
            f"run_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lrs = {}
    for job in ("0", "1"):
        run = tmp_path / "sweep" / job
        config = json.loads((run / "config.json").read_text())
        lrs[job] = config["stage"]["train"]["optim"]["lr"]
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
        assert (run / "checkpoints" / "latest").exists()
    assert lrs == {"0": 1e-3, "1": 2e-3}
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # the jobs went through submitit
