"""rlhf.tracking.Tracker: strict-JSON metrics.jsonl, trim on resume, W&B offline runs that resume by id."""

import json
import subprocess

import pytest

from core.compose import compose
from core.errors import ConfigError
from rlhf.tracking import Tracker, TrackingError
from tests.conftest import ROOT


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rows_are_strict_json_and_flushed_each_step(tmp_path):
    with Tracker(compose(["logger=none"]), tmp_path) as tr:
        tr.log({"step": 1, "train/loss": 2.5, "train/skipped": False, "note": "ok"})
        tr.log({"step": 2, "train/loss": float("nan"), "train/grad_norm": float("inf"), "eval/examples": ["a", "b"]})
        got = rows(tmp_path / "metrics.jsonl")  # readable before finish: flushed per step
    assert got == [
        {"step": 1, "train/loss": 2.5, "train/skipped": False, "note": "ok"},
        {"step": 2, "train/loss": None, "train/grad_norm": None, "eval/examples": ["a", "b"]},
    ]
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()
    with pytest.raises(ValueError, match="step"):
        Tracker(compose(["logger=none"]), tmp_path).log({"train/loss": 1.0})


def test_trim_drops_steps_past_the_checkpoint_and_a_torn_line(tmp_path):
    cfg = compose(["logger=none"])
    with Tracker(cfg, tmp_path) as tr:
        for s in range(1, 8):
            tr.log({"step": s, "train/loss": 1.0 / s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')  # killed mid-write
    with Tracker(cfg, tmp_path) as tr:
        tr.trim(5)
        assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
        tr.log({"step": 6, "train/loss": 0.5})
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    Tracker(cfg, tmp_path / "fresh").trim(3)  # nothing logged yet: a no-op
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_disabled_tracker_writes_nothing(tmp_path):
    run_dir = tmp_path / "rank1"
    with Tracker(compose(["logger=wandb", "logger.mode=offline"]), run_dir, enabled=False) as tr:
        tr.log({"step": 1, "train/loss": 1.0})
        tr.trim(0)
        tr.summary({"final_loss": 1.0})
        assert tr.run_id is None
    assert not run_dir.exists()


def test_bad_logger_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="logger.mode='onlin'"):
        Tracker(compose(["logger.mode=onlin"]), tmp_path)


def test_wandb_offline_run_lands_in_run_dir_and_resumes_by_id(tmp_path, capfd):
    cfg = compose(["logger=wandb", "logger.mode=offline", f"run_dir={tmp_path}"])
    with Tracker(cfg, tmp_path) as tr:
        first = tr.run_id
        assert tr.wandb_run.name == tmp_path.name and tr.wandb_run.config["model"]["name"] == "tiny_dense"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert tr.wandb_run.config["git"]["commit"] == head and len(head) == 40
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["git"]["commit"] == head and saved["stage"]["train"]["steps"] == cfg.stage.train.steps
        tr.log({"step": 1, "train/loss": 2.0, "note": "not numeric", "train/kl": float("nan")})
        tr.log({"step": 2, "train/loss": 1.5})
        tr.summary({"final_loss": 1.5, "eval/examples": ["x"]})
    assert (tmp_path / "wandb_id.txt").read_text().strip() == first
    assert tr.wandb_run is None  # finished

    with Tracker(cfg, tmp_path) as tr:  # the resumed run: same id
        assert tr.run_id == first
        tr.trim(1)
        tr.log({"step": 2, "train/loss": 1.4})
    # One offline folder per segment, both with the run's id (`wandb sync --id ID` uploads them in order).
    segments = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(f"-{first}" in s.name for s in segments), segments
    assert all((s / f"run-{first}.wandb").stat().st_size > 0 for s in segments)
    assert [(r["step"], r["train/loss"]) for r in rows(tmp_path / "metrics.jsonl")] == [(1, 2.0), (2, 1.4)]
    out = capfd.readouterr().out
    assert "wandb" not in out.lower(), out  # quiet: nothing on stdout


def test_wandb_init_failure_says_how_to_avoid_it(tmp_path, monkeypatch):
    import wandb

    def fail(**kwargs):
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(wandb, "init", fail)
    with pytest.raises(TrackingError, match=r"logger.mode=offline.*logger=none") as info:
        Tracker(compose(["logger=wandb", "logger.mode=online"]), tmp_path)
    assert "network is unreachable" in str(info.value) and isinstance(info.value, ConfigError)
    assert not (tmp_path / "wandb_id.txt").exists()
