"""The shared training step: megatron's LR/WD schedule and the non-finite-loss guard."""

import math

import pytest
import torch

from core.compose import compose
from parallel.policy import build_policy
from parallel.step import token_loss, train_step
from tests.conftest import lm_batch as batch


def test_warmup_then_cosine_and_no_decay_on_norms_and_biases(P):
    cfg = compose(
        [
            "stage.train.steps=110",
            "stage.train.optim.warmup_steps=10",
            "stage.train.optim.lr=1e-3",
            "stage.train.optim.min_lr=1e-4",
            "stage.train.optim.weight_decay=0.1",
        ]
    )
    policy = build_policy(cfg)
    sched, lrs = policy.scheduler, {}
    for step in range(111):
        lrs[step] = policy.optimizer.param_groups[0]["lr"]
        sched.step(increment=1)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2) and lrs[110] == pytest.approx(1e-4)
    decays = {g["wd_mult"]: g["weight_decay"] for g in policy.optimizer.param_groups}
    assert decays == {0.0: 0.0, 1.0: 0.1}, "norms and biases take no weight decay"


def test_non_finite_loss_skips_the_update(P):
    policy = build_policy(compose(["stage.train.optim.lr=1e-2"]))
    before = {k: v.clone() for k, v in policy.chunks[0].module.state_dict().items() if torch.is_tensor(v)}

    def nan_loss(batch, model):
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        return out, lambda o: token_loss(o * float("nan"), batch["loss_mask"])

    result = train_step(policy, batch(), forward=nan_loss)
    assert result["update_ok"] is False and math.isnan(result["loss"]) and policy.step == 1
    after = policy.chunks[0].module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step must not touch the weights"
    assert train_step(policy, batch())["update_ok"] is True
