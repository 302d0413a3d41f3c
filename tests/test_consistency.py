"""The mismatch oracle's arithmetic (rlhf.consistency) against direct transcriptions of KL and total
variation, its position and length buckets, and the error that stops a run. The trainer↔engine numbers on
real models come from tests/dist/weight_sync_worker.py (test_hf_bridge) and the r1_zero run (test_r1_zero)."""

import pytest
import torch

from rlhf.consistency import ConsistencyError, divergence, oracle
from rlhf.rollout import RolloutBatch, Sample

V = 40


def _dists(n: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    t = torch.log_softmax(e + spread * torch.randn(n, V, generator=g), -1)
    return e, t


def test_the_full_vocabulary_gives_the_exact_kl_and_tv():
    e, t = _dists(6, 0)
    kl, tv = divergence(e, t, exact=True)
    pe, pt = e.double().exp(), t.double().exp()
    torch.testing.assert_close(kl, (pe * (pe.log() - pt.log())).sum(-1))
    torch.testing.assert_close(tv, 0.5 * (pe - pt).abs().sum(-1))
    assert bool((kl > 0).all()) and bool((tv > 0).all())
    zero_kl, zero_tv = divergence(e, e.clone(), exact=True)
    assert float(zero_kl.abs().max()) < 1e-12 and float(zero_tv.max()) < 1e-12


def test_top_k_and_a_tail_bucket_transcribe_the_coarse_kl_and_bound_the_exact_one():
    e, t = _dists(8, 1)
    k = 5
    ids = e.topk(k, -1).indices
    kl, tv = divergence(e.gather(-1, ids), t.gather(-1, ids), exact=False)
    pe, pt = e.double().exp(), t.double().exp()
    coarse_e = torch.cat([pe.gather(-1, ids), 1 - pe.gather(-1, ids).sum(-1, keepdim=True)], -1)
    coarse_t = torch.cat([pt.gather(-1, ids), 1 - pt.gather(-1, ids).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(kl, (coarse_e * (coarse_e.log() - coarse_t.log())).sum(-1))
    torch.testing.assert_close(tv, 0.5 * (coarse_e - coarse_t).abs().sum(-1))
    exact_kl, exact_tv = divergence(e, t, exact=True)
    assert bool((kl <= exact_kl + 1e-12).all()) and bool((tv <= exact_tv + 1e-12).all())  # coarsening never adds


def _batch(lengths: list[int], k: int = V) -> RolloutBatch:
    """Samples of prompt length 3 and the given completion lengths, the engine's full distributions attached."""
    g = torch.Generator().manual_seed(2)
    samples = []
    for i, n in enumerate(lengths):
        logp = torch.log_softmax(torch.randn(n, V, generator=g), -1)
        top, ids = logp.topk(k, -1)
        tokens = ids[:, 0].tolist()
        samples.append(
            Sample(
                {"prompt": f"prompt {i}"}, [1, 2, 3], tokens, top[:, 0].tolist(), "stop", top_ids=ids, top_logprobs=top
            )
        )
    batch = RolloutBatch.of([samples], seq_len=16, pad_id=0)
    batch.old_logp = batch.engine_logp.clone()
    batch.trainer_top_logp = batch.engine_top_logp.clone()
    return batch


def test_the_oracle_buckets_by_position_and_length_and_stops_on_the_worst_token(P):
    batch = _batch([3, 12, 9])  # max_new_tokens 12: short (≤ 4), long (> 8), long
    row = oracle(batch, V, max_new_tokens=12, max_kl=0.0, step=7)
    assert row["consistency/kl_mean"] < 1e-12 and row["consistency/kl_max"] < 1e-12  # the same distributions
    assert row["consistency/kl_medium"] is None and row["consistency/kl_short"] is not None

    # Shift the trainer's distribution at sample 1's 11th completion token (a late one, of a long sample)
    pos = int(batch.loss_mask[1].nonzero()[10])
    shifted = torch.log_softmax(batch.engine_top_logp[1, pos] + torch.linspace(0, 3, V), -1)
    batch.trainer_top_logp[1, pos] = shifted
    want_kl, want_tv = (float(x) for x in divergence(batch.engine_top_logp[1, pos], shifted, exact=True))
    row = oracle(batch, V, max_new_tokens=12, max_kl=0.0, step=7)
    assert row["consistency/kl_max"] == pytest.approx(want_kl) and row["consistency/tv_max"] == pytest.approx(want_tv)
    assert row["consistency/kl_mean"] == pytest.approx(want_kl / 24)  # 3 + 12 + 9 tokens
    assert row["consistency/kl_late"] == pytest.approx(want_kl / (1 + 4 + 3))  # the last third of each sample
    assert row["consistency/kl_early"] < 1e-12 and row["consistency/kl_short"] < 1e-12
    assert row["consistency/kl_long"] == pytest.approx(want_kl / 21)

    with pytest.raises(
        ConsistencyError,
        match=r"step 7: .* KL .* completion token 11 of 12 of batch row 1 "
        r"\(prompt 'prompt 1'\).*consistency_max_kl=0.01",
    ):
        oracle(batch, V, max_new_tokens=12, max_kl=0.01, step=7)
    oracle(batch, V, max_new_tokens=12, max_kl=want_kl * 1.01, step=7)  # at the bound: no error


def test_a_top_k_below_the_vocabulary_uses_the_tail_bucket(P):
    batch = _batch([6, 6], k=4)
    assert tuple(batch.engine_top_ids.shape) == (2, 16, 4)
    pos = int(batch.loss_mask[0].nonzero()[0])
    batch.trainer_top_logp[0, pos] -= 0.5  # the trainer puts less mass on the engine's top 4, more on the tail
    row = oracle(batch, V, max_new_tokens=6, max_kl=0.0, step=1)
    want = divergence(batch.engine_top_logp[0, pos], batch.trainer_top_logp[0, pos], exact=False)[0]
    assert row["consistency/kl_max"] == pytest.approx(float(want)) and float(want) > 0
