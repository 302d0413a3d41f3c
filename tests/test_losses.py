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
