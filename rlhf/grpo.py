"""The pieces of a GRPO step: rewards → advantages, the trainer's log-probs, the clipped-ratio update.

rlhf/r1_zero.py strings them together; every function here works on this rank's share of prompts
(groups never split across data-parallel ranks, so group statistics stay local).
"""

from __future__ import annotations

import math
from statistics import mean

import torch

from parallel import parallelize as P
from parallel.logprobs import token_entropy, token_logprobs
from rlhf import advantages as adv_lib
from rlhf.losses import LossSettings, rl_loss
from rlhf.rollout import Sample, generate_groups, micro_batches


def generate_and_share(engine, tok, rows: list[dict], sampling) -> tuple[list[list[Sample]], int]:
    """Rollouts on the replica's engine rank, shared with its tensor/pipeline-parallel peers, which
    must train on the same samples."""
    from megatron.core import parallel_state as ps

    out = [generate_groups(engine, tok, rows, sampling) if engine is not None else None]
    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.broadcast_object_list(out, src=torch.distributed.get_global_rank(group, 0), group=group)
    return out[0]


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


def set_advantages(groups: list[list[Sample]], name: str) -> None:
    rewards = torch.tensor([[s.reward for s in g] for g in groups])
    for g, row in zip(groups, adv_lib.compute(name, rewards).tolist()):
        for s, a in zip(g, row):
            s.advantage = a


def _forward(vocab: int, temperature: float, settings: LossSettings | None):
    """megatron forward step: logits → per-token log-probs; the RL loss when `settings` is given,
    else (a scoring pass) the log-probs and entropy as data."""

    def forward(batch, model):
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

        def loss_fn(out):
            logp = token_logprobs(out, batch["labels"], vocab, temperature)
            mask = batch["loss_mask"]
            ent = (token_entropy(out, vocab, temperature) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            if settings is None:
                zero = logp.sum() * 0
                return zero, torch.tensor(1, dtype=torch.int), {"logp": logp.detach(), "entropy": ent.sum()}
            loss_sum, count, m = rl_loss(logp, batch, settings)
            count = count.to(torch.int)
            return loss_sum, count, {"loss": torch.stack([loss_sum.detach(), count.float()]), "entropy": ent.sum(), **m}

        return logits, loss_fn

    return forward


@torch.no_grad()
def logprobs(policy: P.Policy, batch: dict, micro: int, temperature: float) -> tuple[torch.Tensor, float]:
    """Per-token log-probs of every row under `policy` (on the last pipeline stage; zeros elsewhere)
    and the summed per-sequence entropy."""
    rows = list(range(batch["tokens"].shape[0]))
    with P.eval_mode(policy):
        fwd = _forward(policy.cfg.model.vocab_size, temperature, None)
        data = P.forward_backward(policy, micro_batches(batch, rows, micro), forward_only=True, forward=fwd)
    entropy = P.reduce_sums(data, ["entropy"])["entropy"]
    # Only the last pipeline stage computes log-probs, and only it reads them; zeros keep shapes elsewhere.
    return (torch.cat([d["logp"] for d in data]) if data else torch.zeros_like(batch["loss_mask"])), entropy


def distill_advantages(teacher: P.Policy, batch: dict, micro: int, temperature: float) -> torch.Tensor:
    """On-policy distillation's per-token advantage: teacher log p − student log p of each sampled token. Its
    policy gradient is that of −KL(student‖teacher) on the student's own samples (the reverse KL)."""
    batch["teacher_logp"], _ = logprobs(teacher, batch, micro, temperature)  # step_metrics reports the KL
    return (batch["teacher_logp"] - batch["old_logp"]) * batch["loss_mask"]


def update(
    policy: P.Policy, batch: dict, settings: LossSettings, minibatches: int, micro: int, temperature: float
) -> dict:
    """rl.minibatches optimizer steps over disjoint shares of the batch; returns averaged metrics."""
    n = batch["tokens"].shape[0]
    if n % minibatches or (n // minibatches) % micro:
        raise ValueError(
            f"{n} samples do not split into {minibatches} minibatches of micro-batches of {micro}. "
            "Fix: make prompts_per_step × rollout.n a multiple of minibatches × micro_batch_size."
        )
    size, steps = n // minibatches, []
    fwd = _forward(policy.cfg.model.vocab_size, temperature, settings)
    for k in range(minibatches):
        policy.optimizer.zero_grad()
        data = P.forward_backward(
            policy, micro_batches(batch, list(range(k * size, (k + 1) * size)), micro), forward=fwd
        )
        sums = P.reduce_sums(data, ["entropy", "clip_frac", "kl", "sequences"])
        step = P.optimizer_step(policy, P.reduce_loss(data))
        seqs = sums.pop("sequences") or 1
        steps.append({**step, **{k2: v / seqs for k2, v in sums.items()}})
    out = {
        k: mean(s[k] for s in steps)
        for k in ("loss", "grad_norm", "entropy", "clip_frac", "kl", "lr")
        if all(s[k] is not None and math.isfinite(s[k]) for s in steps)
    }
    out["update_ok"] = all(s["update_ok"] for s in steps)
    return out
