"""The GRPO objective against a direct, loop-by-loop transcription of the DeepSeekMath formula."""

import math

import pytest
import torch

from core.errors import ConfigError
from rlhf import advantages
from rlhf.losses import LossSettings, rl_loss


def direct_grpo(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, kl, agg, max_len, engine=None, cap=0.0):
    """J = 1/G Σ_i 1/|o_i| Σ_t [min(ρ A, clip(ρ) A) − β KL]; the loss is −J (and the variants)."""
    per_seq, tok_sum, tok_n = [], 0.0, 0.0
    for i in range(logp.shape[0]):
        seq_sum, n = 0.0, 0.0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi)
            surrogate = torch.minimum(ratio * adv[i, t], clipped * adv[i, t])
            if cap:
                surrogate = surrogate * min(math.exp(float(old[i, t] - engine[i, t])), cap)
            r = ref[i, t] - logp[i, t]
            kl_t = {"k1": -r, "k2": 0.5 * r**2, "k3": torch.exp(r) - r - 1}[kl]
            term = -surrogate + beta * kl_t
            seq_sum, n = seq_sum + term, n + 1
        per_seq.append(seq_sum / n if agg == "seq_mean_token_mean" else seq_sum / max_len)
        tok_sum, tok_n = tok_sum + seq_sum, tok_n + n
    if agg == "token_mean":
        return tok_sum / tok_n
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("cap", [0.0, 1.5])
def test_loss_and_gradient_match_the_formula(agg, kl, eps, cap):
    g = torch.Generator().manual_seed(hash((agg, kl, eps, cap)) % 2**31)
    b, t = 6, 9
    old = -torch.rand(b, t, generator=g) * 3
    logp = (old + 0.4 * torch.randn(b, t, generator=g)).requires_grad_()  # ratios well outside the clip
    ref = old + 0.3 * torch.randn(b, t, generator=g)
    engine = old + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[:, 0] = 1
    s = LossSettings(loss_agg=agg, eps_low=eps[0], eps_high=eps[1], kl=kl, kl_coef=0.05, tis_cap=cap, max_len=t)
    batch = {"old_logp": old, "ref_logp": ref, "engine_logp": engine, "advantages": adv, "loss_mask": mask}
    loss_sum, count, metrics = rl_loss(logp, batch, s)
    ours = loss_sum / count
    (grad,) = torch.autograd.grad(ours, logp)

    logp2 = logp.detach().clone().requires_grad_()
    want = direct_grpo(logp2, old, ref, adv, mask, eps[0], eps[1], 0.05, kl, agg, t, engine, cap)
    (want_grad,) = torch.autograd.grad(want, logp2)
    assert torch.allclose(ours, want, atol=1e-6), (float(ours), float(want))
    assert torch.allclose(grad, want_grad, atol=1e-7)
    assert grad[mask == 0].abs().max() == 0  # prompt and padding positions get no gradient
    ratio = torch.exp(logp.detach() - old)
    clipped = ((ratio < 1 - eps[0]) & (adv < 0)) | ((ratio > 1 + eps[1]) & (adv > 0))
    assert (clipped.float() * mask).sum() > 0  # the test exercises the clip
    assert metrics["clip_frac"] > 0


def test_kl_none_and_zero_coef_leave_only_the_policy_term():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=g)
    logp = old + 0.1 * torch.randn(3, 4, generator=g)
    batch = {"old_logp": old, "ref_logp": old + 1.0, "advantages": torch.ones(3, 4), "loss_mask": torch.ones(3, 4)}
    none = rl_loss(logp, batch, LossSettings(kl="none", kl_coef=0.1))
    zero = rl_loss(logp, batch, LossSettings(kl="k3", kl_coef=0.0))
    with_kl = rl_loss(logp, batch, LossSettings(kl="k3", kl_coef=0.1))
    assert torch.equal(none[0], zero[0])
    assert math.isnan(none[2]["kl"]) and zero[2]["kl"] > 0  # the metric is still reported
    assert with_kl[0] > zero[0]


def _random_terms(seed: int, b: int = 5, t: int = 7, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + spread * torch.randn(b, t, generator=g)
    engine = old + 0.6 * torch.randn(b, t, generator=g)  # ratios on both sides of every band below
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return logp, old, engine, adv, mask


def _ours(logp, batch, s):
    logp = logp.clone().requires_grad_()
    loss_sum, count, metrics = rl_loss(logp, batch, s)
    (grad,) = torch.autograd.grad(loss_sum / count, logp)
    return loss_sum / count, grad, metrics


def _theirs(fn, logp):
    logp = logp.clone().requires_grad_()
    loss = fn(logp)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad


def test_gspo_is_the_clipped_sequence_ratio_of_the_paper():
    """GSPO (Zheng et al. 2025): J = 1/G Σ_i min(s_i A_i, clip(s_i, 1−ε, 1+ε) A_i),
    s_i = (π(y_i|x) / π_old(y_i|x))^(1/|y_i|)."""
    logp, old, engine, adv, mask = _random_terms(1, spread=0.05)
    eps = (3e-3, 4e-3)

    def direct(lp):
        total = 0.0
        for i in range(lp.shape[0]):
            toks = [t for t in range(lp.shape[1]) if mask[i, t]]
            s_i = torch.exp(sum(lp[i, t] - old[i, t] for t in toks) / len(toks))
            a_i = sum(adv[i, t] for t in toks) / len(toks)
            total = total + torch.minimum(s_i * a_i, torch.clamp(s_i, 1 - eps[0], 1 + eps[1]) * a_i)
        return -total / lp.shape[0]

    batch = {"old_logp": old, "advantages": adv, "loss_mask": mask}
    ours, grad, metrics = _ours(logp, batch, LossSettings(loss="gspo", eps_low=eps[0], eps_high=eps[1], kl="none"))
    want, want_grad = _theirs(direct, logp)
    assert torch.allclose(ours, want, atol=1e-6) and torch.allclose(grad, want_grad, atol=1e-7)
    assert 0 < metrics["clip_frac"] < logp.shape[0]  # some sequences clipped, not all


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_bounded_weight():
    """CISPO (MiniMax-M1): J = 1/Σ|o_i| Σ_i Σ_t sg(clip(r_t, 1−ε_low, 1+ε_high)) A_t log π(o_t)."""
    logp, old, engine, adv, mask = _random_terms(2)

    def direct(lp):
        total, n = 0.0, 0
        for i in range(lp.shape[0]):
            for t in range(lp.shape[1]):
                if mask[i, t]:
                    r = torch.clamp(torch.exp(lp[i, t] - old[i, t]).detach(), 1 - 0.2, 1 + 0.28)
                    total, n = total + r * adv[i, t] * lp[i, t], n + 1
        return -total / n

    batch = {"old_logp": old, "advantages": adv, "loss_mask": mask}
    s = LossSettings(loss="cispo", loss_agg="token_mean", eps_low=0.2, eps_high=0.28, kl="none")
    ours, grad, metrics = _ours(logp, batch, s)
    want, want_grad = _theirs(direct, logp)
    assert torch.allclose(ours, want, atol=1e-6) and torch.allclose(grad, want_grad, atol=1e-7)
    ratio = torch.exp(logp - old)
    outside = ((ratio < 0.8) | (ratio > 1.28)) & (mask > 0)
    assert outside.any() and (grad[outside] != 0).all()  # PPO's clip would zero some of these


@pytest.mark.parametrize("correction", ["tis", "mis", "icepop"])
def test_engine_corrections_weight_or_mask_tokens_by_the_engine_ratio(correction):
    """w_t from r_t = π_old/π_engine: tis min(r, C); mis r inside [c, C] else 0 (masked IS); icepop 1 inside
    [c, C] else 0 (IcePop). The loss is GRPO's clipped surrogate times w_t, token by token."""
    logp, old, engine, adv, mask = _random_terms(3)
    low, cap = 0.7, 1.4

    def weight(r):
        inside = low <= r <= cap
        return {"tis": min(r, cap), "mis": r if inside else 0.0, "icepop": 1.0 if inside else 0.0}[correction]

    def direct(lp):
        total = 0.0
        for i in range(lp.shape[0]):
            toks = [t for t in range(lp.shape[1]) if mask[i, t]]
            seq = 0.0
            for t in toks:
                rho = torch.exp(lp[i, t] - old[i, t])
                surrogate = torch.minimum(rho * adv[i, t], torch.clamp(rho, 0.8, 1.2) * adv[i, t])
                seq = seq - surrogate * weight(float(torch.exp(old[i, t] - engine[i, t])))
            total = total + seq / len(toks)
        return total / lp.shape[0]

    batch = {"old_logp": old, "engine_logp": engine, "advantages": adv, "loss_mask": mask}
    s = LossSettings(kl="none", tis_cap=cap, engine_correction=correction, engine_correction_low=low)
    ours, grad, _ = _ours(logp, batch, s)
    want, want_grad = _theirs(direct, logp)
    assert torch.allclose(ours, want, atol=1e-6) and torch.allclose(grad, want_grad, atol=1e-7)
    r = torch.exp(old - engine)
    outside = ((r < low) | (r > cap)) & (mask > 0)
    assert outside.any()
    if correction != "tis":  # masked: those tokens get no gradient at all
        assert (grad[outside] == 0).all()


def test_an_unknown_engine_correction_is_named_at_start_up():
    from core.compose import compose
    from rlhf.losses import check_names

    with pytest.raises(ConfigError, match="stage.rl.engine_correction"):
        check_names(compose(["stage=r1_zero", "stage.rl.engine_correction=clip"]).stage.rl)
    from core.validate import validate

    band = ["stage=r1_zero", "stage.rl.tis_cap=2", "stage.rl.engine_correction=mis", "stage.rl.engine_correction_low=3"]
    with pytest.raises(ConfigError, match="stage.rl.engine_correction_low=3.0 with stage.rl.tis_cap=2.0"):
        validate(compose(band), 1)


@pytest.mark.parametrize("pad", [float("-inf"), float("inf"), float("nan"), 80.0])
def test_masked_positions_holding_anything_leave_the_loss_and_gradient_finite(pad):
    """A pad position's log-probs can be anything (−inf, a huge gap to the reference): exp(…)·0 must not
    turn the masked sums into NaN; the loss and gradient equal those with harmless pads."""
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    batch = {"advantages": torch.randn(4, 1, generator=g).expand(4, 6), "loss_mask": mask}
    clean = {**batch, "old_logp": old, "ref_logp": old + 0.1, "engine_logp": old - 0.1}
    dirty = {k: (v.masked_fill(mask == 0, pad) if k.endswith("logp") else v) for k, v in clean.items()}
    s = LossSettings(kl="k3", kl_coef=0.1, tis_cap=2.0)
    results = []
    for b in (clean, dirty):
        logp = (old + 0.2).masked_fill(mask == 0, pad if b is dirty else 0.0).requires_grad_()
        loss_sum, count, metrics = rl_loss(logp, b, s)
        (grad,) = torch.autograd.grad(loss_sum / count, logp)
        results.append((loss_sum / count, grad, metrics["kl"]))
    assert all(torch.isfinite(x).all() for x in results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_k3_is_nonnegative_and_unbiased():
    g = torch.Generator().manual_seed(1)
    logits_p, logits_q = torch.randn(50, generator=g), torch.randn(50, generator=g)
    p, q = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    exact = float((p.exp() * (p - q)).sum())  # KL(π || π_ref)
    from rlhf.losses import k3

    draws = torch.multinomial(p.exp(), 200_000, replacement=True, generator=g)
    estimate = k3(p[draws], q[draws])
    assert estimate.min() >= 0
    assert abs(float(estimate.mean()) - exact) < 0.02 * max(exact, 0.1)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    a = advantages.compute("grpo", r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / r[0].std(), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: no signal, no NaN
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    dr = advantages.compute("dr_grpo", r)
    assert torch.allclose(dr[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    loo = advantages.compute("rloo", r)
    assert torch.allclose(loo[2, 0], r[2, 0] - r[2, 1:].mean())
    with pytest.raises(ConfigError, match=r"stage.rl.advantage=.ppo.: no such advantage estimator.*grpo"):
        advantages.compute("ppo", r)
    with pytest.raises(ValueError, match="group"):
        advantages.compute("grpo", r[:, :1])


def test_non_finite_guard_skips_then_stops():
    from rlhf.guard import NonFiniteGuard

    guard = NonFiniteGuard(3, "lower the lr")
    for ok in (False, False, True, False, False):  # a good step resets the count
        guard.update(ok, 1, float("nan"))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row.*Fix: lower the lr"):
        guard.update(False, 6, float("nan"))


def test_dapo_overlong_penalty_is_zero_then_linear_then_capped():
    """DAPO's soft overlong punishment: 0 up to L_max − L_cache, then −((|y| − (L_max − L_cache)) / L_cache)
    down to −1 at L_max (scaled by stage.rl.overlong_penalty); off with no buffer."""
    from types import SimpleNamespace

    import parallel  # noqa: F401  (the CPU layer megatron needs, before rlhf.grpo imports it)
    from rlhf.grpo import overlong_penalty

    rl = SimpleNamespace(overlong_buffer=8, overlong_penalty=0.5)
    for length in range(0, 70):
        want = 0.5 * min(max(length - (64 - 8), 0) / 8, 1.0)
        assert overlong_penalty(length, 64, rl) == pytest.approx(want)
    assert overlong_penalty(60, 64, rl) == pytest.approx(0.25)
    assert overlong_penalty(64, 64, SimpleNamespace(overlong_buffer=0, overlong_penalty=0.5)) == 0.0


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
    import parallel  # noqa: F401
    from rlhf.grpo import informative
    from rlhf.rollout import Sample

    def group(*rewards):
        return [Sample({}, [1], [2], [0.0], "stop", reward=r) for r in rewards]

    same, differ, tie = group(1.0, 1.0, 1.0), group(0.0, 1.0, 0.0), group(0.5, 0.5)
    assert informative([same, differ, tie]) == [differ]
