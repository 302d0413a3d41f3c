"""tools.report: PNG plots and an HTML page from a run dir's metrics.jsonl; unreadable input exits 2."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_rl_run(run_dir: Path, steps: int = 60) -> None:
    """A synthetic RL run: everything but the entropy, with a NaN KL at one step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {
                "step": s,
                "reward/mean": 1 - math.exp(-s / 20),
                "reward/accuracy": 0.8 * (1 - math.exp(-s / 25)),
                "reward/format": min(1.0, s / 30),
                "response_length/mean": 20 + s + 3 * math.sin(s),
                "train/kl": None if s == 7 else 1e-3 * s,
                "train/loss": 0.1 * math.cos(s),
                "rollout/logprob_diff_mean": 1e-3,
                "rollout/logprob_diff_max": 0.02 + 1e-3 * (s % 5),
                "note": "text values are ignored",
                "time/generation_s": 2.0 + 0.01 * s,
                "time/update_s": 1.0,
                "time/sync_load_s": 0.1,
                "time/eval_s": 3.0 if s % 20 == 0 else 0.0,
                "time/step_s": 3.2 + 0.01 * s + (3.0 if s % 20 == 0 else 0.0),
            }
            f.write(json.dumps(row) + "\n")
    (run_dir / "eval.json").write_text(json.dumps({"eval/pass@1": 0.62, "eval/cons@4": 0.7}))
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "examples": ["<b>1+1</b>"]}))


def test_report_builds_pngs_and_a_page_that_references_them(tmp_path):
    write_rl_run(tmp_path)
    assert report.main([f"run_dir={tmp_path}"]) == 0
    pngs = {p.name: p for p in (tmp_path / "report").glob("*.png")}
    assert set(pngs) == {"reward.png", "response_length.png", "kl.png", "logprob_gap.png", "loss.png", "step_time.png"}
    for p in pngs.values():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, p
    page = (tmp_path / "report.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {f"report/{n}" for n in pngs}
    assert all((tmp_path / src).is_file() for src in re.findall(r'<img src="([^"]+)"', page))
    assert "Policy entropy: no finite train/entropy" in page  # the skipped plot is noted
    alt = re.search(r'src="report/step_time.png" alt="([^"]+)"', page).group(1)
    assert alt == "time/generation_s, time/update_s, time/sync_load_s, time/eval_s"  # phases with time, stacked
    assert "eval/pass@1" in page and "0.62" in page and "eval/cons@4" in page
    assert "&lt;b&gt;1+1&lt;/b&gt;" in page and "<b>1+1</b>" not in page  # values are escaped
    assert "http" not in page  # self-contained


def test_pretrain_only_run_gets_the_loss_plot_and_the_summary(tmp_path):
    rows = [{"step": s, "train/loss": 5 / s, "train/lr": 1e-3, "perf/tokens_per_s": 1e4} for s in range(1, 41)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train_summary.json").write_text(json.dumps({"final_loss": 0.125, "eval/pass@1_greedy": 0.07}))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "reward.png").write_bytes(b"stale")  # from an earlier report of this dir
    assert report.main(["--run-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["loss.png"]
    page = (tmp_path / "report.html").read_text()
    assert 'src="report/loss.png"' in page and "train_summary.json" in page and "eval/pass@1_greedy" in page
    assert "train/loss (step 40)" in page and "0.125" in page


def test_missing_metrics_exits_2_naming_the_path(tmp_path, capsys):
    assert report.main([f"run_dir={tmp_path / 'nope'}"]) == 2
    assert str(tmp_path / "nope" / "metrics.jsonl") in capsys.readouterr().err


def test_bad_line_exits_2_with_its_line_number(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n\n{"step": 2, "train/loss": NaN\n')
    out = subprocess.run(
        [sys.executable, "-m", "tools.report", f"run_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"{tmp_path / 'metrics.jsonl'}: line 3 is not JSON" in out.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("line", ["[1, 2]", '{"train/loss": 1.0}'])
def test_rows_need_a_step(tmp_path, capsys, line):
    (tmp_path / "metrics.jsonl").write_text(line + "\n")
    assert report.main(["--run-dir", str(tmp_path)]) == 2
    assert "line 1" in capsys.readouterr().err
