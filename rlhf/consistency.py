"""The train↔engine mismatch oracle (rollout.consistency=topk): at every completion position of a step, the
KL and total variation between the engine's next-token distribution and the trainer's.

The engine returns its k most likely tokens per position with their log-probs (Sampling.top_logprobs); the
trainer scores the same ids in the pass that gives its old log-probs (parallel.logprobs.candidate_logprobs).
Both distributions are then compared over those k tokens plus one tail bucket holding the rest of the mass,
a lower bound of the full KL (coarsening never increases it). With k = -1 the engine returns the whole
vocabulary and the KL is exact: fine for a small vocabulary, refused for a real one (core.validate).

KL(engine ‖ trainer): the samples come from the engine, so this is the divergence the importance ratios
correct for. Reported as token means, overall, by position in the response (thirds: early, middle, late)
and by response length (thirds of max_new_tokens: short, medium, long), with the worst token. Under an
overlapped rollout mode the engine serves older weights by design, and the KL includes that lag.
"""

from __future__ import annotations

import torch

from parallel import parallelize as P

POSITIONS = ("early", "middle", "late")
LENGTHS = ("short", "medium", "long")
_TINY = 1e-12  # tail masses below this count as zero (float rounding of 1 - Σ p)


class ConsistencyError(RuntimeError):
    """The engine's distribution is further from the trainer's than rollout.consistency_max_kl allows."""


def divergence(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, exact: bool) -> tuple[torch.Tensor, ...]:
    """Per position (leading dims), KL(engine ‖ trainer) and TV over the last dim's k tokens plus a tail
    bucket (none when `exact`: the k tokens are the whole vocabulary). In float64."""
    le, lt = engine_logp.double(), trainer_logp.double()
    pe, pt = le.exp(), lt.exp()
    kl = (pe * (le - lt)).sum(-1)
    tv = (pe - pt).abs().sum(-1)
    if not exact:
        tail_e, tail_t = (1 - pe.sum(-1)).clamp(min=0), (1 - pt.sum(-1)).clamp(min=0)
        kl = kl + torch.where(tail_e > _TINY, tail_e * (tail_e.log() - tail_t.clamp(min=_TINY).log()), 0.0)
        tv = tv + (tail_e - tail_t).abs()
    return kl, tv / 2


def _thirds(index: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """0, 1 or 2: which third of `size` (≥ 1) the 0-based `index` falls in."""
    return torch.clamp(3 * index // size.clamp(min=1), max=2)


def oracle(batch, vocab_size: int, max_new_tokens: int, max_kl: float, step: int) -> dict:
    """Collective. The step's consistency/ metrics from a RolloutBatch whose engine_top_logp and
    trainer_top_logp are set; above `max_kl` (> 0) a ConsistencyError naming the step, the worst token and
    the values."""
    mask = batch.loss_mask > 0
    exact = batch.engine_top_ids.shape[-1] >= vocab_size
    kl, tv = divergence(batch.engine_top_logp, batch.trainer_top_logp, exact)
    kl, tv = kl * mask, tv * mask
    lengths = mask.sum(-1, keepdim=True)
    index = mask.cumsum(-1) - 1  # the token's place in its completion
    where = _thirds(index, lengths.expand_as(index))
    how_long = _thirds(lengths - 1, torch.full_like(lengths, max_new_tokens)).expand_as(index)
    sums = {"tokens": mask.sum(), "kl": kl.sum(), "tv": tv.sum()}
    for groups, names in ((where, POSITIONS), (how_long, LENGTHS)):
        for b, name in enumerate(names):
            inside = mask & (groups == b)
            sums |= {f"n_{name}": inside.sum(), f"kl_{name}": kl[inside].sum(), f"tv_{name}": tv[inside].sum()}
    g = P.reduce_sums([sums], list(sums))
    last = P.is_last_pipeline_stage()  # only it holds the trainer's log-probs
    peak = P.max_over_world([float(kl.max()) if last else 0.0, float(tv.max()) if last else 0.0])
    row = {
        "consistency/kl_mean": g["kl"] / max(g["tokens"], 1),
        "consistency/tv_mean": g["tv"] / max(g["tokens"], 1),
        "consistency/kl_max": peak[0],
        "consistency/tv_max": peak[1],
    }
    for name in POSITIONS + LENGTHS:
        n = g[f"n_{name}"]
        row[f"consistency/kl_{name}"] = g[f"kl_{name}"] / n if n else None
        row[f"consistency/tv_{name}"] = g[f"tv_{name}"] / n if n else None
    if max_kl > 0 and not peak[0] <= max_kl:  # every rank stops, with the worst token's story
        local = (float(kl.max()), _worst(batch, kl, tv, step, max_kl)) if last else (float("-inf"), "")
        raise ConsistencyError(max(P.gather_world(local), key=lambda told: told[0])[1])
    return row


def _worst(batch, kl: torch.Tensor, tv: torch.Tensor, step: int, max_kl: float) -> str:
    """What the run stops on: this rank's worst token."""
    flat = int(kl.argmax())
    row, pos = divmod(flat, kl.shape[1])
    mask = batch.loss_mask[row] > 0
    place, length = int(mask[:pos].sum()), int(mask.sum())
    sample = batch.samples[row]
    return (
        f"step {step}: the engine's next-token distribution is KL {float(kl[row, pos]):.3e} (TV "
        f"{float(tv[row, pos]):.3e}) from the trainer's at completion token {place + 1} of {length} of batch row "
        f"{row} (prompt {str(sample.row.get('prompt', ''))[:60]!r}) (> rollout.consistency_max_kl={max_kl}); "
        f"its sampled token's log-prob is {float(batch.engine_logp[row, pos]):.5f} in the engine, "
        f"{float(batch.old_logp[row, pos]):.5f} in the trainer. The engine does not compute what the trainer "
        "does: weights not synced or not re-packed, another precision or kernel. Fix: find the cause (the "
        "consistency/ metrics show where it starts); raise the bound only for a known precision gap."
    )
