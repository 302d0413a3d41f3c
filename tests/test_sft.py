"""The sft stage: fine-tuning a base on prompt/response rows (loss on the response only, packed), steps from
epochs, resume, and clear errors for missing inputs."""

import json
import os
import subprocess
import sys

import pytest

from core.config import ConfigError, compose
from core.data import DataError
from rlhf.tasks import addition
from tests.conftest import ROOT


def _train(*overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), R1_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "rlhf.train", *map(str, overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if check and proc.returncode:
        pytest.fail(f"rlhf.train {' '.join(map(str, overrides))} failed:\n{proc.stderr[-4000:]}")
    return proc


def test_sft_teaches_the_base_the_traces_it_is_shown(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "sft"
    _train("stage=pretrain", f"run_dir={base}", "stage.train.steps=40", "data.num_train=3000", "data.num_eval=32", "logger=none")
    rows = addition.sft_rows(600)
    data = tmp_path / "rs"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train("stage=sft", f"stage.init_from={base}", f"stage.data_from={data}", f"run_dir={tuned}", "stage.epochs=2",
           "stage.train.micro_batch_size=32", "data.num_eval=32", "logger=none")  # fmt: skip
    metrics = [json.loads(x) for x in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 19  # ceil(2 epochs × 600 rows (one sample a row at this length) / 64)
    assert metrics[-1]["train/loss"] < 0.85 * metrics[0]["train/loss"]
    before = json.loads((base / "pretrain_summary.json").read_text())
    after = json.loads((tuned / "pretrain_summary.json").read_text())
    # A 40-step base answers bare; after SFT it opens every greedy answer with a trace (right or not).
    assert after["eval/reasoning_first_greedy"] >= 0.9 > 0.1 >= before["eval/reasoning_first_greedy"]


def test_the_loss_covers_the_response_and_eos_only():
    from core.tokenizer import build_char_tokenizer
    from rlhf import sft

    cfg = compose(["stage=sft", "stage.init_from=x", "data.num_train=8"])
    tok = build_char_tokenizer()
    data = sft.packed(cfg, tok)
    rows = sft.rows(cfg)
    response_tokens = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert int(data["loss_mask"].sum()) == response_tokens
    assert cfg.stage.train.steps == 1  # ceil(2 epochs × 8 rows / 64)


def test_missing_inputs_are_named(tmp_path):
    from rlhf import sft

    with pytest.raises(DataError, match="a directory without sft.parquet or sft.jsonl"):
        sft.rows(compose(["stage=sft", f"stage.data_from={tmp_path}"]))
    with pytest.raises(ConfigError, match="stage.data_from"):
        sft.rows(compose(["stage=sft", "data=countdown"]))
    out = _train("stage=sft", f"run_dir={tmp_path / 'run'}", "logger=none", check=False)
    assert out.returncode == 2 and "set stage.init_from" in out.stderr
