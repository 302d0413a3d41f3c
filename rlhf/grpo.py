"""The pieces of a GRPO step: rollouts with their rewards (`collect`), the trainer's log-probs, the
clipped-ratio update. Advantages are rlhf.advantages'.

rlhf/r1_zero.py strings them together; every function here works on this rank's share of prompts
(groups never split across data-parallel ranks, so group statistics stay local).
"""

from __future__ import annotations

import math
from statistics import mean

import torch

from core.data import scatter_rows, shuffled_rows, trimmed_micro_batches
from core.ledger import phase
from core.model import without_mtp
from parallel import parallelize as P
from parallel.logprobs import CHUNK_TOKENS, LogprobRequest, head_logprobs
from parallel.policy import Policy, eval_mode, unwrap
from parallel.step import forward_backward, optimizer_step
from rlhf.losses import LossSettings, rl_loss
from rlhf.rollout import RolloutBatch, Sample, generate_groups


@phase("generation")
def generate_and_share(engine, tok, rows: list[dict], sampling) -> tuple[list[list[Sample]], int]:
    """Rollouts on the replica's engine rank, shared with its tensor/pipeline-parallel peers, which
    must train on the same samples."""
    return P.share_model_parallel(generate_groups(engine, tok, rows, sampling) if engine is not None else None)


@phase("reward")
def score(groups: list[list[Sample]], pool, rl, max_new_tokens: int) -> dict:
    """Sets each sample's rewards (weighted total in .reward); returns per-reward counts for metrics."""
    flat = [s for g in groups for s in g]
    result = pool.score([s.text for s in flat], [s.row for s in flat])
    for i, s in enumerate(flat):
        s.rewards = {name: vals[i] for name, vals in result.per_reward.items()}
        s.reward = result.total[i] - overlong_penalty(len(s.completion_ids), max_new_tokens, rl)
    return {"errors": sum(result.errors.values()), "timeouts": sum(result.timeouts.values())}


def overlong_penalty(length: int, max_new_tokens: int, rl) -> float:
    """DAPO's soft penalty: 0 up to max − buffer, then growing linearly to rl.overlong_penalty at max."""
    if rl.overlong_buffer <= 0:
        return 0.0
    over = length - (max_new_tokens - rl.overlong_buffer)
    return rl.overlong_penalty * min(max(over, 0) / rl.overlong_buffer, 1.0)


def informative(groups: list[list[Sample]]) -> list[list[Sample]]:
    """Groups whose rewards differ: the others have zero advantage and teach nothing (DAPO)."""
    return [g for g in groups if len({s.reward for s in g}) > 1]


def collect(engine, tok, rows: list[dict], position: int, sampling, pool, rl, seq_len: int):
    """Rollout → reward for prompts_per_step groups (this DP rank's share) from the prompt stream at
    `position`. With dynamic sampling, groups of equal rewards are dropped and more prompts drawn, up to
    max_refill_rounds; a short batch is topped up with dropped groups (zero advantage) to keep shapes.
    Returns the step's RolloutBatch and the stream's next position."""
    keep, dropped = [], []
    info = {"prompts": 0, "truncated": 0, "reward_errors": 0, "reward_timeouts": 0, "prompt_ids": []}
    want = rl.prompts_per_step // P.data_parallel_size()
    for _ in range(1 + (rl.max_refill_rounds if rl.dynamic_sampling else 0)):
        ids = shuffled_rows(position, rl.prompts_per_step, 0, len(rows))
        position += rl.prompts_per_step
        info["prompt_ids"] += ids  # every prompt drawn (all ranks'), in stream order
        groups, truncated = generate_and_share(engine, tok, [rows[i] for i in P.split_for_data_parallel(ids)], sampling)
        counts = score(groups, pool, rl, sampling.max_new_tokens)
        info["prompts"] += len(groups)
        info["truncated"] += truncated
        info["reward_errors"] += counts["errors"]
        info["reward_timeouts"] += counts["timeouts"]
        good = {id(g) for g in (informative(groups) if rl.dynamic_sampling else groups)}
        keep += [g for g in groups if id(g) in good]
        dropped += [g for g in groups if id(g) not in good]
        if P.all_ranks_true(len(keep) >= want):
            break
    groups = (keep + dropped)[:want]
    info["informative_frac"] = len(informative(groups)) / max(len(groups), 1)
    return RolloutBatch.of(groups, seq_len, tok.pad_token_id, info), position


def _forward(vocab: int, temperature: float, settings: LossSettings | None, chunk_tokens: int = CHUNK_TOKENS):
    """megatron forward step: per-token log-probs and entropy; the RL loss when `settings` is given,
    else (a scoring pass) the log-probs and entropy as data.

    The model's last stage applies its output layer `chunk_tokens` tokens at a time (head_logprobs), so
    a micro-batch's full [b, s, vocab] fp32 logits never exist; earlier stages return hidden states.
    Multi-token-prediction layers take no part (without_mtp)."""

    def forward(batch, model):
        request = LogprobRequest(batch["labels"], vocab, temperature, chunk_tokens)
        with without_mtp(unwrap(model)):
            out = model(
                batch["tokens"],
                batch["position_ids"],
                batch["attention_mask"],
                output_processor=head_logprobs,
                output_processor_context=request,
            )

        def loss_fn(out):
            logp, token_ent = out
            mask = batch["loss_mask"]
            ent = (token_ent * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            if settings is None:
                zero = logp.sum() * 0
                return zero, torch.tensor(1, dtype=torch.int), {"logp": logp.detach(), "entropy": ent.sum()}
            loss_sum, count, m = rl_loss(logp, batch, settings)
            count = count.to(torch.int)
            data = {"loss": torch.stack([loss_sum.detach(), count.float()]), "entropy": ent.sum(), **m}
            if "old_logp" not in batch:  # an on-policy update: these are the old log-probs (rl_loss)
                data["logp"] = logp.detach()
            return loss_sum, count, data

        return out, loss_fn

    return forward


@torch.no_grad()
def logprobs(policy: Policy, batch: dict, micro: int, temperature: float) -> tuple[torch.Tensor, float]:
    """Per-token log-probs of every row under `policy` (on the last pipeline stage; zeros elsewhere)
    and the summed per-sequence entropy."""
    mbs, parts = _trimmed(policy, batch, list(range(batch["tokens"].shape[0])), micro)
    with eval_mode(policy):
        fwd = _forward(policy.cfg.model.vocab_size, temperature, None)
        data = forward_backward(policy, mbs, forward_only=True, forward=fwd)
    entropy = P.reduce_sums(data, ["entropy"])["entropy"]
    # Only the last pipeline stage computes log-probs, and only it reads them; zeros keep shapes elsewhere.
    return scatter_rows([d["logp"] for d in data], parts, batch["loss_mask"]), entropy


def _trimmed(policy: Policy, batch: dict, rows: list[int], micro: int):
    """`rows` in length-sorted micro-batches, each only as long as its longest row, of `micro` rows or
    filled to stage.train.micro_batch_tokens (core.data)."""
    p, budget = policy.cfg.parallel, policy.cfg.stage.train.micro_batch_tokens
    return trimmed_micro_batches(batch, rows, micro, multiple=p.tensor if p.sequence_parallel else 1, max_tokens=budget)


@phase("update")
def update(
    policy: Policy, batch: dict, settings: LossSettings, minibatches: int, micro: int, temperature: float
) -> dict:
    """rl.minibatches optimizer steps over disjoint shares of the batch; returns averaged metrics.

    A batch without old_logp is updated exactly on-policy (one minibatch: the weights that score the
    samples are those that will be updated), so the update's own forward gives the old log-probs; they
    come back as "old_logp" (on the last pipeline stage; zeros elsewhere), for the step's metrics."""
    n = batch["tokens"].shape[0]
    if "old_logp" not in batch and minibatches != 1:
        raise ValueError(
            f"{minibatches} minibatches update off-policy after the first: old log-probs must be computed first"
        )
    if n % minibatches or (n // minibatches) % micro and not policy.cfg.stage.train.micro_batch_tokens:
        raise ValueError(
            f"{n} samples do not split into {minibatches} minibatches of micro-batches of {micro}. "
            "Fix: make prompts_per_step × rollout.n a multiple of minibatches × micro_batch_size."
        )
    size, steps = n // minibatches, []
    fwd = _forward(policy.cfg.model.vocab_size, temperature, settings)
    for k in range(minibatches):
        policy.optimizer.zero_grad()
        mbs, parts = _trimmed(policy, batch, list(range(k * size, (k + 1) * size)), micro)
        data = forward_backward(policy, mbs, forward=fwd)
        sums = P.reduce_sums(data, ["entropy", "clip_frac", "kl", "sequences"])
        step = optimizer_step(policy, P.reduce_loss(data))
        seqs = sums.pop("sequences") or 1
        steps.append({**step, **{k2: v / seqs for k2, v in sums.items()}})
    out = {
        k: mean(s[k] for s in steps)
        for k in ("loss", "grad_norm", "entropy", "clip_frac", "kl", "lr")
        if all(s[k] is not None and math.isfinite(s[k]) for s in steps)
    }
    out["update_ok"] = all(s["update_ok"] for s in steps)
    if "old_logp" not in batch:  # one minibatch: `data` and `parts` cover every row
        out["old_logp"] = scatter_rows([d["logp"] for d in data], parts, batch["loss_mask"])
    return out
