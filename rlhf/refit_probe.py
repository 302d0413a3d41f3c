"""The post-refit probe: after each weight sync the trainer and the engine score the same fixed sequence, and
their log-probs must agree within rollout.refit_probe_tol (fp32: ~1e-6 is usual, 1e-4 the default bound).
A checksum proves the bytes arrived (inference.refit); this proves the engine serves them: a stale cache, a
tensor left unloaded or a kernel that did not re-pack shows up here as a gap, the step it happens.

Runs in the sync rollout mode, where the engine has loaded the weights when the sync returns, and on one
pipeline stage (the first stage hosts the engine, the last computes log-probs).
"""

from __future__ import annotations

import torch

from inference.refit import RefitError
from rlhf import grpo
from rlhf.rollout import Sample, to_batch

PROBE_TOKENS = 24


def probe_sequence(vocab: int) -> list[int]:
    """A fixed sequence spread over the vocabulary (real checkpoints: any ids below its size)."""
    return [(1 + 7919 * i) % vocab for i in range(PROBE_TOKENS)]


def trainer_logprobs(policy, tokens: list[int]) -> list[float]:
    """Collective: log p(tokens[i] | tokens[:i]) for i ≥ 1 under the policy, at temperature 1."""
    sample = Sample({}, tokens[:1], tokens[1:], [0.0] * (len(tokens) - 1), "length")
    batch = to_batch([sample], len(tokens) - 1, pad_id=0)
    logp, _ = grpo.logprobs(policy, batch, 1, 1.0)
    return logp[0][batch["loss_mask"][0].bool()].tolist()


def probe(policy, engine, tol: float, version: int) -> float | None:
    """Collective. The largest |Δ log p| between trainer and engine on the probe sequence (None on ranks
    without an engine); above `tol` a RefitError naming the version, the position and both values."""
    tokens = probe_sequence(policy.cfg.model.vocab_size)
    ours = trainer_logprobs(policy, tokens)
    if engine is None:
        return None
    theirs = engine.score(tokens)
    gaps = torch.tensor(ours) - torch.tensor(theirs)
    worst = int(gaps.abs().argmax())
    gap = float(gaps.abs()[worst])
    if not gap <= tol:
        raise RefitError(
            f"post-refit probe (weight version {version}): the engine's log-prob of the probe sequence's token "
            f"{worst + 1} is {theirs[worst]:.6f}, the trainer's {ours[worst]:.6f} (|Δ| {gap:.2e} > "
            f"rollout.refit_probe_tol={tol}): the engine does not serve the weights just sent. Fix: look for "
            "a refit that left a tensor or cache stale; raise the tolerance only for a lower-precision engine."
        )
    return gap


def enabled(cfg) -> bool:
    return cfg.rollout.refit_probe_tol > 0 and cfg.rollout.mode == "sync" and cfg.parallel.pipeline == 1
