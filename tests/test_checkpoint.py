"""Checkpoints in one process: round trip, atomicity, exact optimizer resume, clear errors.
Resharding across layouts is tested in test_equivalence.py."""

import json

import pytest
import torch

from core.compose import compose
from parallel.policy import build_policy
from parallel.step import train_step
from tests.conftest import lm_batch as batch


def new_policy(P):
    torch.manual_seed(0)
    return build_policy(
        compose(["stage.train.optim.lr=1e-2", "stage.train.micro_batch_size=4", "stage.train.global_batch_size=4"])
    )


def weights(policy):
    return {k: v.detach().clone() for k, v in policy.chunks[0].module.state_dict().items() if torch.is_tensor(v)}


def test_round_trip_and_latest_pointer(P, tmp_path):
    from parallel import checkpoint as ckpt

    a = new_policy(P)
    train_step(a, batch())
    path = ckpt.save(a, tmp_path, extra={"data_position": 7})
    assert path.name == "step_00000001" and (tmp_path / "latest").read_text().strip() == path.name
    b = new_policy(P)
    meta = ckpt.load(b, tmp_path)
    assert meta["extra"] == {"data_position": 7} and b.step == 1
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact(P, tmp_path):
    from parallel import checkpoint as ckpt

    straight = new_policy(P)
    for i in range(3):
        train_step(straight, batch(i))
    resumed = new_policy(P)
    train_step(resumed, batch(0))
    ckpt.save(resumed, tmp_path)
    resumed = new_policy(P)
    ckpt.load(resumed, tmp_path)
    for i in (1, 2):
        train_step(resumed, batch(i))
    ws, wr = weights(straight), weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws), "a resumed run must match the uninterrupted one exactly"


def test_interrupted_save_leaves_the_previous_checkpoint(P, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from parallel import checkpoint as ckpt

    policy = new_policy(P)
    ckpt.save(policy, tmp_path)
    train_step(policy, batch())
    real_save = dist_checkpointing.save

    def dies_halfway(state, path, **kw):
        real_save(state, path, **kw)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(dist_checkpointing, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(policy, tmp_path)
    monkeypatch.undo()
    assert ckpt.resolve(tmp_path).name == "step_00000000"
    assert ckpt.load(new_policy(P), tmp_path)["step"] == 0
    ckpt.save(policy, tmp_path)  # the next save cleans up the leftover temporary dir
    assert ckpt.resolve(tmp_path).name == "step_00000001"
    assert not list(tmp_path.glob(".tmp.*"))


def test_keep_prunes_old_steps(P, tmp_path):
    from parallel import checkpoint as ckpt

    policy = new_policy(P)
    for _ in range(3):
        train_step(policy, batch())
        ckpt.save(policy, tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_clear_errors(P, tmp_path):
    from parallel import checkpoint as ckpt

    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.resolve(tmp_path)
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(ckpt.CheckpointError, match="names step_00000009, which is missing or incomplete"):
        ckpt.resolve(tmp_path)
    policy = new_policy(P)
    ckpt.save(policy, tmp_path / "weights", with_optimizer=False)
    with pytest.raises(ckpt.CheckpointError, match="holds weights only"):
        ckpt.load(policy, tmp_path / "weights")


def test_damaged_checkpoint_is_refused_and_the_previous_one_offered(P, tmp_path):
    from parallel import checkpoint as ckpt

    policy = new_policy(P)
    ckpt.save(policy, tmp_path)
    train_step(policy, batch())
    newest = ckpt.save(policy, tmp_path)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    assert ckpt.verify(newest) == [] and "rng/rank_00000.pt" in manifest
    shard = max((n for n in manifest if n.endswith(".distcp")), key=lambda n: manifest[n][0])
    data = bytearray((newest / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    (newest / shard).write_bytes(bytes(data))
    with pytest.raises(
        ckpt.CheckpointError, match=rf"damaged: {shard}: .*sha256.*previous checkpoint is step_00000000"
    ):
        ckpt.load(new_policy(P), tmp_path)
    (newest / "rng" / "rank_00000.pt").unlink()
    assert any("rng/rank_00000.pt is missing" in p for p in ckpt.verify(newest))
    (tmp_path / "latest").write_text("step_00000000\n")  # the offered fix works
    assert ckpt.load(new_policy(P), tmp_path)["step"] == 0


def test_the_kl_reference_of_a_run_without_init_from_stays_its_step_0_weights_on_resume(P, tmp_path):
    """r1_zero.reference: the first start saves the policy's step-0 weights as the reference; a resumed
    run (its policy trained on) loads those, not its own weights; one that cannot is a clear error."""
    from core.errors import ConfigError
    from rlhf.r1_zero import reference

    policy = new_policy(P)
    assert not policy.cfg.stage.init_from
    start = weights(policy)
    reference(policy.cfg, policy, tmp_path)
    for i in range(2):  # the first step warms up at lr 0
        train_step(policy, batch(i))
    assert not all(torch.equal(start[k], v) for k, v in weights(policy).items())
    resumed = weights(reference(policy.cfg, policy, tmp_path))
    assert resumed.keys() == start.keys() and all(torch.equal(start[k], resumed[k]) for k in start)
    with pytest.raises(ConfigError, match="resumes at policy step 2 without stage.init_from"):
        reference(policy.cfg, policy, tmp_path / "other")


def test_the_kl_reference_is_refreshed_every_n_steps_and_a_resume_reads_the_refresh(P, tmp_path):
    """stage.rl.ref_refresh_every=2 (R1-Zero: 400): at steps 2, 4, ... the reference becomes the policy, and
    is saved, so that a resumed run compares with the refreshed reference, not the initial one."""
    import dataclasses

    from rlhf.r1_zero import reference, refresh_reference

    policy = new_policy(P)
    cfg = dataclasses.replace(policy.cfg, run_dir=str(tmp_path))
    cfg.stage.rl.ref_refresh_every = 2
    ref = reference(cfg, policy, tmp_path)
    start = weights(ref)
    for step in (1, 2, 3):
        for i in range(2):
            train_step(policy, batch(step * 2 + i))
        at_step = weights(policy)
        refresh_reference(cfg, step, policy, ref)
        if step == 1:
            assert all(torch.equal(start[k], v) for k, v in weights(ref).items())  # not yet
        if step == 2:
            refreshed = at_step
    now = weights(ref)
    assert all(torch.equal(refreshed[k], now[k]) for k in now)  # step 2's policy; step 3 left it
    assert not all(torch.equal(at_step[k], now[k]) for k in now)
    resumed = weights(reference(cfg, policy, tmp_path))
    assert all(torch.equal(refreshed[k], resumed[k]) for k in resumed)
