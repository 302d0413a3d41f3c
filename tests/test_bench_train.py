"""tools.bench train_mfu (what tools/gpu_check.sh runs on a GPU) on this CPU at the tiny size: it trains,
and its MFU is the model FLOPs of the steps' tokens over their time and the measured matmul peak."""

import json
import subprocess
import sys

from core.compose import compose
from tests.conftest import ROOT, cli_env


def test_train_mfu_counts_model_flops_of_full_length_rows(tmp_path):
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, "-m", "tools.bench", "train_mfu", "--out", out, "--steps", "1", "--threads", "1"]
    sizes = ["stage.train.seq_length=32", "stage.train.micro_batch_size=2", "stage.train.global_batch_size=4"]
    proc = subprocess.run([*map(str, cmd), *sizes], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(out.read_text())["figures"]
    assert f["tokens_per_step"] == 4 * 32 and f["dtype"] == "fp32" and len(f["losses"]) == 3
    m = compose(["stage=pretrain"]).model
    assert f["matmul_params"] > m.hidden_size * m.vocab_size  # the output head, once, plus the layers
    forward = 2 * f["matmul_params"] * 128 + 2 * m.num_layers * m.hidden_size * 4 * 32**2
    assert f["model_flops_per_step"] == 3 * forward
    mfu = json.loads(out.read_text())["ratios"]["train_mfu"]
    assert mfu == f["model_flops_per_step"] / f["median_step_s"] / f["matmul_peak_flops_per_s"] and 0 < mfu < 1
