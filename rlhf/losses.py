"""The GRPO objective, token by token, and how token values reduce to one loss.

    loss_t = max(−A·ρ_t, −A·clip(ρ_t, 1−ε_low, 1+ε_high)) · w_t + β · KL_t,   ρ_t = π/π_old

w_t corrects for the engine sampling from another distribution than the trainer's (its weights lag, its
kernels differ): stage.rl.engine_correction over the ratio r_t = π_old/π_engine, when stage.rl.tis_cap > 0
(else 1): `tis` min(r_t, cap) (truncated IS); `mis` r_t inside [low, cap], else 0 (masked IS: the token is
dropped, not truncated); `icepop` 1 inside [low, cap], else 0 (IcePop's two-sided mask, no reweighting);
low = stage.rl.engine_correction_low.

Policy losses (stage.rl.loss): `grpo` the clipped ratio above; `gspo` GSPO's sequence-level ratio
s_i = exp(mean_t log ρ_t) clipped as one value per sequence; `cispo` MiniMax-M1's CISPO,
−sg(clip(ρ_t)) · A · log π_t (the clipped ratio is a stop-gradient weight, so no token loses its gradient).

Reductions return (sum, count) so that megatron, which sums both over micro-batches and data-parallel
ranks and divides once, gives the same loss at every layout.
Extend with `@POLICY_LOSSES.register("name")`, `@ENGINE_CORRECTIONS.register`, `@KL_ESTIMATORS.register`,
`@LOSS_AGGS.register`; the stage.rl keys name them and are checked at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.registry import Registry

POLICY_LOSSES = Registry("policy loss", "stage.rl.loss")
ENGINE_CORRECTIONS = Registry("engine correction", "stage.rl.engine_correction")
KL_ESTIMATORS = Registry("KL estimator", "stage.rl.kl", extra_names=("none",))
LOSS_AGGS = Registry("loss aggregation", "stage.rl.loss_agg")


@KL_ESTIMATORS.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """π_ref/π − log(π_ref/π) − 1: unbiased and never negative (Schulman's k3, as in DeepSeekMath)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class Tokens:
    """What a policy loss reads, each [b, t] and zero off the mask: the current log-probs (with gradient),
    the clipping anchor's, the advantages and the loss mask."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


@POLICY_LOSSES.register("grpo")
def clipped_ratio(t: Tokens, eps_low: float, eps_high: float):
    """PPO's clipped surrogate per token; returns (loss, clipped) where clipped marks tokens whose
    gradient the clip removed."""
    ratio = torch.exp(t.logp - t.old_logp)
    unclipped = -t.advantages * ratio
    clipped = -t.advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@POLICY_LOSSES.register("gspo")
def sequence_ratio(t: Tokens, eps_low: float, eps_high: float):
    """GSPO: one ratio per sequence, the geometric mean of its token ratios, clipped as a whole (GSPO's
    ε are small, ~3e-4 / 4e-4); the advantage is the sequence's mean over its tokens. The sequence's loss is
    given to each of its tokens, so a per-sequence token mean (seq_mean_token_mean) gives GSPO's objective."""
    n = t.mask.sum(-1).clamp(min=1)
    s = torch.exp(((t.logp - t.old_logp) * t.mask).sum(-1) / n)[:, None]
    adv = ((t.advantages * t.mask).sum(-1) / n)[:, None]
    unclipped, clipped = -adv * s, -adv * s.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped).expand_as(t.logp)
    return loss, (clipped > unclipped).float().expand_as(t.logp)


@POLICY_LOSSES.register("cispo")
def clipped_is_weight(t: Tokens, eps_low: float, eps_high: float):
    """CISPO: −sg(clip(ρ, 1−ε_low, 1+ε_high)) · A · log π per token. Unlike PPO's clip, a clipped token
    keeps its gradient (only its weight is bounded); `clipped` marks the tokens whose weight was clipped."""
    ratio = torch.exp(t.logp - t.old_logp).detach()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    return -weight * t.advantages * t.logp, (weight != ratio).float()


@ENGINE_CORRECTIONS.register("tis")
def truncated_is(ratio: torch.Tensor, low: float, cap: float) -> torch.Tensor:
    return ratio.clamp(max=cap)


@ENGINE_CORRECTIONS.register("mis")
def masked_is(ratio: torch.Tensor, low: float, cap: float) -> torch.Tensor:
    return torch.where((ratio >= low) & (ratio <= cap), ratio, torch.zeros_like(ratio))


@ENGINE_CORRECTIONS.register("icepop")
def icepop(ratio: torch.Tensor, low: float, cap: float) -> torch.Tensor:
    return ((ratio >= low) & (ratio <= cap)).to(ratio.dtype)


@LOSS_AGGS.register("seq_mean_token_mean")
def seq_mean_token_mean(values, mask, max_len):
    """GRPO: the token mean of each sequence, then the mean over sequences."""
    per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum(), values.new_tensor(values.shape[0])


@LOSS_AGGS.register("token_mean")
def token_mean(values, mask, max_len):
    """DAPO: every token of the batch weighs the same, so long answers are not diluted."""
    return (values * mask).sum(), mask.sum()


@LOSS_AGGS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values, mask, max_len):
    """Dr.GRPO: token sums over a constant length, so the loss has no length bias."""
    return (values * mask).sum() / max_len, values.new_tensor(values.shape[0])


@dataclass(frozen=True)
class LossSettings:
    loss: str = "grpo"
    loss_agg: str = "seq_mean_token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl: str = "k3"
    kl_coef: float = 0.0
    tis_cap: float = 0.0
    max_len: int = 64
    engine_correction: str = "tis"
    engine_correction_low: float = 0.5

    @classmethod
    def from_config(cls, rl, max_len: int) -> "LossSettings":
        check_names(rl)
        return cls(
            rl.loss,
            rl.loss_agg,
            rl.clip_eps_low,
            rl.clip_eps_high,
            rl.kl,
            rl.kl_coef,
            rl.tis_cap,
            max_len,
            rl.engine_correction,
            rl.engine_correction_low,
        )


def check_names(rl) -> None:
    """ConfigError naming the stage.rl key of a loss, correction, KL estimator or aggregation no registry has."""
    POLICY_LOSSES.check(rl.loss)
    ENGINE_CORRECTIONS.check(rl.engine_correction)
    KL_ESTIMATORS.check(rl.kl)
    LOSS_AGGS.check(rl.loss_agg)


def rl_loss(logp, batch: dict, s: LossSettings):
    """Token log-probs of the current policy ([b, t], masked by batch["loss_mask"]) → (loss_sum, count,
    metric sums). `batch` holds per-token advantages, and old_logp, ref_logp / engine_logp when used. Without
    old_logp the update is exactly on-policy: the current log-probs, detached, are the clipping anchor (ratio 1,
    the gradient of the ratio still flows), which saves the scoring pass that would compute the same values."""
    mask = batch["loss_mask"].float()
    # Every per-token input is zeroed off the mask before any exp: a pad position may hold anything (a -inf
    # log-prob), and exp(inf)·0 in the masked sums would be NaN. Zeroed, they give exp(0) and no gradient.
    keep = mask > 0
    on = lambda x: torch.where(keep, x, torch.zeros_like(x))  # noqa: E731
    logp = on(logp)
    old = on(batch["old_logp"]) if "old_logp" in batch else logp.detach()
    pg, clipped = POLICY_LOSSES[s.loss](Tokens(logp, old, on(batch["advantages"]), mask), s.eps_low, s.eps_high)
    if s.tis_cap > 0:
        ratio = torch.exp(old - on(batch["engine_logp"]))
        pg = pg * ENGINE_CORRECTIONS[s.engine_correction](ratio, s.engine_correction_low, s.tis_cap)
    total = pg
    kl = None
    if s.kl != "none" and "ref_logp" in batch:
        kl = KL_ESTIMATORS[s.kl](logp, on(batch["ref_logp"]))
        if s.kl_coef:
            total = pg + s.kl_coef * kl
    agg = LOSS_AGGS[s.loss_agg]
    loss_sum, count = agg(total, mask, s.max_len)
    with torch.no_grad():  # per-sequence token means, summed: the caller divides by the sequence count
        seq = lambda v: ((v * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()  # noqa: E731
        metrics = {
            "clip_frac": seq(clipped),
            "kl": seq(kl) if kl is not None else torch.tensor(float("nan")),
            "sequences": torch.tensor(float(logp.shape[0])),
        }
    return loss_sum, count, metrics
