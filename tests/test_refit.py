"""The post-refit probe (rlhf.refit_probe) in one process: a megatron policy and an engine built from its
HF export agree on the probe sequence; after training steps that were never sent, the probe names the gap;
after the sync it passes again. The receipts' checksums are tests/test_engines.py's."""

import pytest
import torch

from core.compose import compose
from parallel.policy import build_policy
from parallel.step import train_step
from tests.conftest import lm_batch as batch


def test_the_probe_passes_on_synced_weights_and_names_a_stale_engine(P, tmp_path):
    from inference.engine import build_engine
    from inference.refit import RefitError
    from parallel import hf_bridge
    from parallel.weight_sync import sync_weights
    from rlhf import refit_probe

    torch.manual_seed(0)
    cfg = compose(["stage.train.optim.lr=1e-2", "stage.train.micro_batch_size=4", "stage.train.global_batch_size=4"])
    policy = build_policy(cfg)
    hf_bridge.save_hf(policy, tmp_path / "hf")
    engine = build_engine("hf", model_dir=str(tmp_path / "hf"), max_model_len=64)
    assert refit_probe.probe(policy, engine, 1e-4, version=0) < 1e-4
    for i in range(2):  # the first step warms up at lr 0
        train_step(policy, batch(i))
    with pytest.raises(RefitError, match=r"post-refit probe \(weight version 2\).*rollout.refit_probe_tol=0.0001"):
        refit_probe.probe(policy, engine, 1e-4, version=2)
    sync_weights(policy, engine, 2**20)
    assert refit_probe.probe(policy, engine, 1e-4, version=2) < 1e-4
