"""The GPU path: the local spec in bf16, Transformer Engine, FP8, NCCL, vLLM's sleep mode. Skipped only where
no CUDA GPU is present (or, for the TE and vLLM cases, where those extras are not installed).

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


def run(case, tmp_path, needs="transformer_engine"):
    pytest.importorskip(needs, reason=f"{needs} not installed (R1_EXTRAS=gpu)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, WORKER, case, tmp_path], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((tmp_path / f"{case}.json").read_text())


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_dsv3"])
def test_local_spec_on_cuda_scores_like_fp32_and_trains_in_bf16(tmp_path, model):
    out = run(f"bf16_local:{model}", tmp_path, needs="megatron.core")
    assert out["backend"] == "nccl" and out["param_dtype"] == "torch.bfloat16"
    assert out["trimmed_logprob_max_diff"] < 1e-4, out  # trimmed micro-batches vs one padded, both fp32
    assert out["bf16_logits_max_diff"] < 0.1 * out["logits_scale"], out  # bf16: 8 mantissa bits, summed over layers
    assert out["losses"][-1] < out["losses"][0] and all(x == x for x in out["losses"]), out


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_dsv3"])
def test_te_spec_matches_local_spec(tmp_path, model):
    out = run(f"te_vs_local:{model}", tmp_path)
    assert out["backend"] == "nccl" and out["te"] is True
    assert out["logits_max_diff"] < 2e-3, out  # TF32 / fused kernels vs the plain PyTorch path


def test_fp8_training_step(tmp_path):
    out = run("fp8:tiny_dense", tmp_path)
    assert out["losses"][-1] < out["losses"][0] and all(map(lambda x: x == x, out["losses"]))


def test_vllm_sleep_frees_gpu_memory_and_wake_up_serves_the_same_model(tmp_path):
    out = run("vllm_sleep:tiny_dense", tmp_path, needs="vllm")
    assert out["freed_bytes"] >= 0.9 * out["kv_bytes"], out  # level 1: KV cache dropped, weights to host
    assert out["rewoken_bytes"] >= 0.9 * out["kv_bytes"], out  # wake_up takes it back
    assert out["same_tokens"] and out["logprob_max_diff"] <= 1e-5, out
    assert out["changed_after_sync"], out  # a sync after sleep/wake_up reaches the engine


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_dsv3"])
def test_trainer_to_vllm_weight_sync_on_gpu(tmp_path, model):
    """tests/test_hf_bridge.py's weight-sync check on CUDA vLLM (its MoE and MLA kernels, not the CPU ones)."""
    pytest.importorskip("vllm")
    from tests.test_hf_bridge import check_weight_sync

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, ROOT / "tests" / "dist" / "weight_sync_worker.py", tmp_path / "sync.json", model]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    check_weight_sync(json.loads((tmp_path / "sync.json").read_text()))
