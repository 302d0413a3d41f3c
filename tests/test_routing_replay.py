"""MoE routing replay (R3) on tiny_dsv3 with real vLLM: the engine's record of which experts it routed each
token to, the trainer's agreement with it, and the replay that makes the trainer compute what the engine
did (tests/dist/routing_replay_worker.py), at EP1 (one process, engine in-process) and EP2 (two processes,
engine in a process of its own)."""

import json
import sys

import pytest

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate
from parallel.routing_replay import route_mode
from tests.conftest import ROOT, read_metrics, require_module, run_worker, train_cli

WORKER = ROOT / "tests" / "dist" / "routing_replay_worker.py"
FLOOR_KL = 1e-5  # fp32 trainer vs engine, per token, exact over the vocabulary (measured ≤ 4.6e-7)


def check(row: dict) -> None:
    served, record, replay = row["served"], row["moved_record"], row["moved_replay"]
    layers = len(served["agreement"])
    assert layers == 3 and row["route_shape"] == [17, layers, 4]  # 8 prompt + 10 new - 1 positions, top-4
    # The engine serves the trainer's weights: every token of every MoE layer routed alike (which a record
    # that put a request's rows at wrong positions, or another request's, would not give), KL at fp32's floor.
    assert served["agreement"] == [1.0] * layers, row
    assert abs(served["kl_mean"]) <= FLOOR_KL and served["kl_max"] <= FLOOR_KL, row
    # The engine's router bias moved: its experts change, and the trainer routing by itself sees it ...
    assert row["biases_moved"] == layers and min(record["agreement"]) < 0.9, row
    # ... replaying the engine's experts, the trainer computes what the engine did again (measured: KL max
    # 1.5e-4 (EP1) and 9.2e-5 (EP2) routing by itself, 3.3e-7 and 4.3e-7 replaying).
    assert replay["kl_max"] <= FLOOR_KL and abs(replay["kl_mean"]) <= FLOOR_KL, row
    assert record["kl_max"] > max(FLOOR_KL, 20 * replay["kl_max"]), row
    # An update replaying the routes starts from the replaying scoring pass's log-probs
    assert row["update"]["update_ok"] and row["update"]["old_logp_gap"] <= 1e-6, row


@pytest.mark.slow
def test_routing_replay_at_ep1_with_the_engine_in_process(tmp_path):
    require_module("vllm")
    run_worker([sys.executable, WORKER, tmp_path / "ep1.json"], timeout=600)
    check(json.loads((tmp_path / "ep1.json").read_text()))


@pytest.mark.slow
def test_routing_replay_at_ep2_with_the_engine_in_its_own_process(tmp_path):
    require_module("vllm")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port", "29631", "--nproc-per-node", "2"]
    run_worker([*torchrun, WORKER, tmp_path / "ep2.json", "parallel=ep2"], timeout=600)
    row = json.loads((tmp_path / "ep2.json").read_text())
    assert row["world"] == 2
    check(row)


def test_a_grpo_run_replays_the_engines_routing_within_the_oracles_bound(tmp_path):
    """The loop's wiring: vLLM records routes, the old log-probs' pass and both minibatch updates replay
    them, and the whole-vocabulary oracle holds fp32's floor as its stopping bound."""
    run = tmp_path / "r3"
    replay = ["stage=r1_zero", "model=tiny_dsv3", "stage.rl.routing_replay=true"]
    # What the run does with routes: the engine records them (without, the replaying forward finds none
    # and fails) and the policy is built to replay them (without, parallel.routing_replay.routing fails)
    assert route_mode(compose(replay)) == "replay"
    train_cli(
        *replay,
        f"run_dir={run}",
        "stage.train.steps=2",
        "rollout.consistency=topk",
        "rollout.consistency_topk=-1",
        f"rollout.consistency_max_kl={FLOOR_KL}",
        "stage.rl.prompts_per_step=2",
        "rollout.n=4",
        "stage.train.micro_batch_size=4",
        "data.num_eval=2",
        "eval.k=1",
        "reward.workers=1",
        "logger=none",
    )
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["consistency/kl_max"] <= FLOOR_KL and r["sync/probe_gap"] < 1e-4, r
        assert "consistency/routing_agreement" not in r  # replayed: the policy routed as the engine did


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny_dense"], "stage.rl.routing_replay=true with model=tiny_dense, which has no MoE layers"),
        (["model=tiny_dsv3", "rollout=hf"], "stage.rl.routing_replay=true with rollout.engine=hf"),
        (["model=tiny_dsv3", "parallel=pp2"], "stage.rl.routing_replay=true with parallel.pipeline=2"),
    ],
)
def test_routing_replay_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["stage=r1_zero", "stage.rl.routing_replay=true", *overrides]), 2)
