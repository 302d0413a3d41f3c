"""Chunked log-probs and entropy (the output layer applied a chunk of tokens at a time, recomputed in the
backward) against the full-logits path: values, parameter gradients, the GRPO forward step, and memory."""

import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from core.compose import compose
from parallel.logprobs import LogprobRequest, head_logprobs, token_entropy, token_logprobs
from tests.conftest import grpo_batch

SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=2"]


def _model(overrides: list[str]):
    from core import model as model_lib
    from parallel.policy import runtime_config

    cfg = compose([*SMALL, *overrides])
    torch.manual_seed(0)
    model = model_lib.build_gpt(cfg.model, model_lib.transformer_config(cfg.model, **runtime_config(cfg)), False)
    return cfg, model


def _batch(b: int, s: int, vocab: int, seed: int = 0) -> dict:
    from tests.conftest import lm_batch

    mb = lm_batch(seed, b, s, vocab)[0]
    mb["loss_mask"][0, : s // 2] = 0  # a prompt: the entropy is averaged over completion tokens only
    return mb


def _naive(model, mb, vocab, temperature):
    logits = model(mb["tokens"], mb["position_ids"], mb["attention_mask"])
    return token_logprobs(logits, mb["labels"], vocab, temperature), token_entropy(logits, vocab, temperature)


def _full_log_softmax(model, mb, vocab, temperature):
    """log π(· | prefix) over the real vocabulary (padded rows cut), from the full logits."""
    logits = model(mb["tokens"], mb["position_ids"], mb["attention_mask"])
    return torch.log_softmax(logits[..., :vocab].float() / temperature, -1)


def _chunked(model, mb, vocab, temperature, chunk):
    request = LogprobRequest(mb["labels"], vocab, temperature, chunk)
    return model(
        mb["tokens"],
        mb["position_ids"],
        mb["attention_mask"],
        output_processor=head_logprobs,
        output_processor_context=request,
    )


@pytest.mark.parametrize(
    "preset, tied",
    [("tiny_dense", True), ("tiny_dense", False), ("tiny_dsv3", False)],  # dsv3: MoE and an MTP layer
)
def test_chunked_equals_full_logits_with_gradients(P, preset, tied):
    # vocab 1000 pads to 1024: the padded rows are masked in every chunk.
    cfg, model = _model([f"model={preset}", "model.vocab_size=1000", f"model.tie_word_embeddings={str(tied).lower()}"])
    assert model.share_embeddings_and_output_weights is tied
    vocab, temperature = cfg.model.vocab_size, 0.7
    mb = _batch(3, 11, vocab)  # 33 tokens in chunks of 8: four full chunks and a partial one
    coef = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]

    want_logp, want_ent = _naive(model, mb, vocab, temperature)
    want_grads = torch.autograd.grad((want_logp * coef).sum(), params)
    logp, ent = _chunked(model, mb, vocab, temperature, chunk=8)
    grads = torch.autograd.grad((logp * coef).sum(), params)
    # The mismatch oracle's candidates (k ids per position) come out of the same chunks as log-softmax rows
    ids = torch.randint(0, vocab, (3, 11, 6), generator=torch.Generator().manual_seed(2))
    request = LogprobRequest(mb["labels"], vocab, temperature, 8, candidates=ids)
    with torch.no_grad():
        *_, top = model(
            mb["tokens"],
            mb["position_ids"],
            mb["attention_mask"],
            output_processor=head_logprobs,
            output_processor_context=request,
        )
        want_top = _full_log_softmax(model, mb, vocab, temperature).gather(-1, ids)
    torch.testing.assert_close(top, want_top, rtol=0, atol=1e-5)

    assert logp.shape == ent.shape == (3, 11) and not ent.requires_grad
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    head = model.shared_embedding_or_output_weight() if tied else model.output_layer.weight
    assert float(grads[[p is head for p in params].index(True)].abs().max()) > 0


def _rl_fields(mbs: list[dict], logps: list[torch.Tensor], s: int):
    """Old, reference and engine log-probs near `logps`, and random group advantages: a GRPO batch."""
    from rlhf.losses import LossSettings

    g = torch.Generator().manual_seed(2)
    for m, lp in zip(mbs, logps):
        m["old_logp"] = lp + 0.1 * torch.randn(lp.shape, generator=g)
        m["ref_logp"] = lp + 0.1 * torch.randn(lp.shape, generator=g)
        m["engine_logp"] = m["old_logp"]
        m["advantages"] = torch.randn(lp.shape[0], 1, generator=g).expand(lp.shape).contiguous()
    return LossSettings(loss_agg="token_mean", eps_low=0.2, eps_high=0.28, kl="k3", kl_coef=0.05, max_len=s)


def test_grpo_forward_step_equals_full_logits(P):
    """rlhf.grpo's forward through megatron's schedule and DDP: scoring pass and update gradients."""
    from parallel.policy import build_policy, unwrap
    from parallel.step import forward_backward
    from rlhf import grpo
    from rlhf.losses import rl_loss

    policy = build_policy(compose([*SMALL, "model.vocab_size=1000"]))
    vocab, temperature, s = policy.cfg.model.vocab_size, 0.9, 12
    mbs = [_batch(2, s, vocab, seed) for seed in (0, 1)]
    model = unwrap(policy.chunks[0])

    whole = {k: torch.cat([m[k] for m in mbs]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    logp, entropy = grpo.logprobs(policy, whole, 2, temperature)
    with torch.no_grad():
        naive = [_naive(model, m, vocab, temperature) for m in mbs]
    torch.testing.assert_close(logp, torch.cat([lp for lp, _ in naive]), rtol=0, atol=1e-5)
    want_ent = sum(
        float(((e * m["loss_mask"]).sum(-1) / m["loss_mask"].sum(-1)).sum()) for (_, e), m in zip(naive, mbs)
    )
    assert entropy == pytest.approx(want_ent, abs=1e-4)

    settings = _rl_fields(mbs, [lp for lp, _ in naive], s)

    def naive_forward(batch, model):
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

        def loss_fn(out):
            loss_sum, count, _ = rl_loss(token_logprobs(out, batch["labels"], vocab, temperature), batch, settings)
            return loss_sum, count.to(torch.int), {"loss": torch.stack([loss_sum.detach(), count.float()])}

        return logits, loss_fn

    def main_grads(forward):
        data = forward_backward(policy, mbs, forward=forward)
        return [float(d["loss"][0]) for d in data], {n: p.main_grad.clone() for n, p in model.named_parameters()}

    want_losses, want = main_grads(naive_forward)
    losses, got = main_grads(grpo._forward(vocab, temperature, settings, chunk_tokens=5))
    assert losses == pytest.approx(want_losses, abs=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "budget, want_parts, want_widths",
    [(0, [[1, 5], [3, 2], [4, 0]], [16, 11, 7]), (24, [[1], [5], [3, 2], [4, 0]], [16, 13, 11, 7])],
    ids=["two_rows_each", "24_token_budget"],
)
def test_length_sorted_trimmed_micro_batches_equal_the_padded_ones(P, budget, want_parts, want_widths):
    """RL micro-batches cut to their longest row (longest first), of 2 rows or filled up to a token budget
    (stage.train.micro_batch_tokens: rows × longest ≤ 24): the same log-probs, entropy, loss and gradients
    as micro-batches of 2 rows padded to the batch's width."""
    from core.data import micro_batches, trimmed_micro_batches
    from parallel.policy import build_policy, unwrap
    from parallel.step import forward_backward
    from rlhf import grpo
    from rlhf.losses import LossSettings

    policy = build_policy(compose([*SMALL, "model.vocab_size=1000", f"stage.train.micro_batch_tokens={budget}"]))
    model, vocab, temperature = unwrap(policy.chunks[0]), policy.cfg.model.vocab_size, 0.8
    batch, rows = grpo_batch(vocab), list(range(6))
    mbs, parts = trimmed_micro_batches(batch, rows, 2, max_tokens=budget)
    assert parts == want_parts and [m["tokens"].shape[1] for m in mbs] == want_widths
    scoring = grpo._forward(vocab, temperature, None)
    padded = forward_backward(policy, micro_batches(batch, rows, 2), forward_only=True, forward=scoring)
    want = torch.cat([d["logp"] for d in padded]) * batch["loss_mask"]
    logp, entropy = grpo.logprobs(policy, batch, 2, temperature)
    torch.testing.assert_close(logp * batch["loss_mask"], want, rtol=0, atol=1e-6)
    assert entropy == pytest.approx(sum(float(d["entropy"]) for d in padded), abs=1e-5)

    settings = LossSettings(
        loss_agg="seq_mean_token_mean", eps_low=0.2, eps_high=0.28, kl="k3", kl_coef=0.05, max_len=16
    )
    update = grpo._forward(vocab, temperature, settings)

    def run(micro):
        data = forward_backward(policy, micro, forward=update)
        return sum(float(d["loss"][0]) for d in data), {n: p.main_grad.clone() for n, p in model.named_parameters()}

    (want_loss, want_grads), (loss, grads) = run(micro_batches(batch, rows, 2)), run(mbs)
    assert loss == pytest.approx(want_loss, rel=1e-6)  # a sum of 6 rows: fp32 rounding is relative
    # Shorter rows change the matmuls' summation order, so fp32 rounding differs: 3e-7 of each gradient's
    # norm measured (grads up to 9 in size), where a row that leaked padding would be off by its whole share.
    off = {n: float((grads[n] - w).norm() / w.norm()) for n, w in want_grads.items() if w.norm() > 0}
    assert max(off.values()) <= 1e-6, sorted(off.items(), key=lambda kv: -kv[1])[:3]


def test_an_on_policy_update_needs_no_old_logprob_pass(P):
    """One minibatch per rollout batch: the update's own forward gives the old log-probs, so the scoring pass
    is skipped, with the same loss, metrics and gradients as when it runs."""
    from parallel.policy import build_policy, unwrap
    from parallel.step import forward_backward
    from rlhf import grpo

    policy = build_policy(compose([*SMALL, "model.vocab_size=1000"]))
    model, vocab, s, temperature = unwrap(policy.chunks[0]), policy.cfg.model.vocab_size, 10, 0.9
    mbs = [_batch(2, s, vocab, seed) for seed in (0, 1)]
    whole = {k: torch.cat([m[k] for m in mbs]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    old = grpo.logprobs(policy, whole, 2, temperature)[0]
    settings = _rl_fields(mbs, list(old.split(2)), s)
    settings = dataclasses.replace(settings, tis_cap=2.0)  # the anchor feeds the engine correction too
    for m, lp in zip(mbs, old.split(2)):
        m["old_logp"] = lp
    skipped = [{k: v for k, v in m.items() if k != "old_logp"} for m in mbs]

    def run(batches):
        data = forward_backward(policy, batches, forward=grpo._forward(vocab, temperature, settings))
        return data, {n: p.main_grad.clone() for n, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = run(mbs), run(skipped)
    for w, g in zip(want, got):
        for key in ("loss", "clip_frac", "kl", "entropy"):
            torch.testing.assert_close(g[key], w[key], rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(torch.cat([g["logp"] for g in got]), old, rtol=0, atol=1e-6)
    assert all(float(w["clip_frac"]) == 0 for w in want)  # ratio 1: nothing clipped, as on-policy must be
    for name in want_grads:
        torch.testing.assert_close(
            got_grads[name], want_grads[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )

    batch = {k: torch.cat([m[k] for m in skipped]) for k in skipped[0] if k != "attention_mask"}
    # With the mismatch oracle the update's forward also scores the engine's top ids, as a scoring pass would
    batch["engine_top_ids"] = torch.randint(0, vocab, (4, s, 3), generator=torch.Generator().manual_seed(5))
    batch["engine_top_logp"] = torch.zeros(4, s, 3)
    want_top = grpo.scoring_pass(policy, batch, 2, temperature, oracle=True).top_logp
    with torch.no_grad():
        full = torch.cat([_full_log_softmax(model, m, vocab, temperature) for m in mbs])
    mask = batch["loss_mask"][..., None]
    torch.testing.assert_close(want_top * mask, full.gather(-1, batch["engine_top_ids"]) * mask, rtol=0, atol=1e-5)
    stats = grpo.update(policy, batch, settings, 1, 2, temperature, oracle=True)
    torch.testing.assert_close(stats["old_logp"], old, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["trainer_top_logp"], want_top, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="old log-probs must be computed first"):
        grpo.update(policy, batch, settings, 2, 2, temperature)


def test_the_rl_forward_neither_computes_nor_trains_multi_token_prediction(P):
    """DeepSeek-V3's MTP layer adds a next-next-token cross-entropy to any forward without labels; in a GRPO
    step it must not: the policy gradient does not depend on the MTP weights, and an update leaves them."""
    from parallel.policy import build_policy, unwrap
    from parallel.step import forward_backward, optimizer_step
    from rlhf import grpo

    overrides = ["model=tiny_dsv3", "model.vocab_size=1000", "model.num_layers=2", "stage.train.optim.lr=1e-2"]
    optim = ["stage.train.optim.warmup_steps=0", "stage.train.optim.weight_decay=0.1"]
    policy = build_policy(compose([*overrides, *optim]), train_mtp=False)
    model, vocab, s = unwrap(policy.chunks[0]), policy.cfg.model.vocab_size, 10
    mtp = {n for n, _ in model.named_parameters() if n.startswith("mtp.")}
    assert mtp and all(not p.requires_grad for n, p in model.named_parameters() if n in mtp)
    mbs = [_batch(2, s, vocab, seed) for seed in (0, 1)]
    whole = {k: torch.cat([m[k] for m in mbs]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    settings = _rl_fields(mbs, list(grpo.logprobs(policy, whole, 2, 1.0)[0].split(2)), s)

    def grads(forward):
        forward_backward(policy, mbs, forward=forward)
        return {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def with_mtp_loss(batch, m):  # the forward megatron runs unless told otherwise: its MTP loss included
        logits = m(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        loss_sum, count, _ = grpo.rl_loss(token_logprobs(logits, batch["labels"], vocab, 1.0), batch, settings)
        return logits, lambda out: (loss_sum, count.to(torch.int), {})

    rl = grpo._forward(vocab, 1.0, settings)
    before, polluted = grads(rl), grads(with_mtp_loss)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.mul_(3.0)
    after, polluted_after = grads(rl), grads(with_mtp_loss)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The check can fail: with the MTP loss in, the same change of MTP weights moves the trunk's gradient.
    assert any(not torch.equal(polluted[n], polluted_after[n]) for n in before)

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads(rl)
    assert optimizer_step(policy, 1.0)["update_ok"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert moved and not moved & mtp, sorted(moved & mtp)


def _peak_bytes(fn) -> int:
    """High-water mark of CPU tensor memory allocated while `fn` runs, from the profiler's allocation
    (positive) and free (negative) records in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_chunked_peak_memory_is_a_fraction_of_the_full_logits(P):
    cfg, model = _model(["model.vocab_size=32000", "model.tie_word_embeddings=false", "model.num_layers=1"])
    vocab, (b, s) = cfg.model.vocab_size, (2, 128)
    mb = _batch(b, s, vocab)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(path):
        def run():
            logp, ent = path()
            torch.autograd.grad(logp.sum(), params)

        return run

    naive = _peak_bytes(step(lambda: _naive(model, mb, vocab, 1.0)))
    chunked = _peak_bytes(step(lambda: _chunked(model, mb, vocab, 1.0, chunk=32)))
    logits_fp32 = b * s * vocab * 4  # 32.8 MB; the weight grad (8.2 MB) is the same on both paths
    assert naive > 3 * logits_fp32, "the measurement must see the full path's logits and their copies"
    assert chunked < logits_fp32 and chunked < naive / 4, (chunked, naive)
