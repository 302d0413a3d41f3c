"""The GPU path: Transformer Engine spec, FP8, NCCL. Skipped only where no CUDA GPU is present.

Each test runs in a fresh process (NCCL and TE own global state) through tests/dist/gpu_worker.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu
WORKER = ROOT / "tests" / "dist" / "gpu_worker.py"


def run(case, tmp_path):
    pytest.importorskip("transformer_engine", reason="transformer-engine not installed (R1_EXTRAS=gpu)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, WORKER, case, tmp_path], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((tmp_path / f"{case}.json").read_text())


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_dsv3"])
def test_te_spec_matches_local_spec(tmp_path, model):
    out = run(f"te_vs_local:{model}", tmp_path)
    assert out["backend"] == "nccl" and out["te"] is True
    assert out["logits_max_diff"] < 2e-3, out  # TF32 / fused kernels vs the plain PyTorch path


def test_fp8_training_step(tmp_path):
    out = run("fp8:tiny_dense", tmp_path)
    assert out["losses"][-1] < out["losses"][0] and all(map(lambda x: x == x, out["losses"]))
