"""The pieces of a GRPO step: rollouts with their rewards (`collect`), the trainer's log-probs, the
clipped-ratio update. Advantages are rlhf.advantages'.

rlhf/r1_zero.py strings them together; every function here works on this rank's share of prompts
(groups never split across data-parallel ranks, so group statistics stay local).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean

import torch

from core.data import scatter_rows, shuffled_rows, trimmed_micro_batches
from core.ledger import phase
from core.model import without_mtp
from parallel import parallelize as P
from parallel import routing_replay
from parallel.logprobs import CHUNK_TOKENS, LogprobRequest, head_logprobs
from parallel.policy import Policy, eval_mode, unwrap
from parallel.step import forward_backward, optimizer_step
from rlhf.losses import LossSettings, rl_loss
from rlhf.rollout import RolloutBatch, Sample, generate_groups


@phase("generation")
def generate_and_share(
    engine, tok, rows: list[dict], sampling, tools=None, share: bool = True
) -> tuple[list[list[Sample]], int]:
    """Rollouts (with `tools`' calls, rlhf.tool_calls) on the replica's engine rank, shared with its
    tensor/pipeline-parallel peers, which must train on the same samples (unless `share` is False: the
    caller shares them)."""
    made = generate_groups(engine, tok, rows, sampling, tools) if engine is not None else None
    return P.share_model_parallel(made) if share else made


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


def collect(
    engine, tok, rows: list[dict], position: int, sampling, pool, rl, seq_len: int, tools=None, alone: bool = False
):
    """Rollout (calling `tools`, rlhf.tool_calls.ToolRunner, where completions call it) → reward for
    prompts_per_step groups (this DP rank's share) from the prompt stream at `position`. With dynamic
    sampling, groups of equal rewards are dropped and more prompts drawn, up to max_refill_rounds; a short
    batch is topped up with dropped groups (zero advantage) to keep shapes.
    Returns the step's RolloutBatch and the stream's next position.

    Every rank calls it together, unless `alone`: then only the replica's engine rank does, with no
    collective (an overlapped rollout producer's thread, which shares the batch itself; the refill decision
    is this replica's, so core.validate refuses dynamic sampling with several replicas then)."""
    keep, dropped = [], []
    info = {"prompts": 0, "truncated": 0, "reward_errors": 0, "reward_timeouts": 0, "prompt_ids": []}
    want = rl.prompts_per_step // P.data_parallel_size()
    for _ in range(1 + (rl.max_refill_rounds if rl.dynamic_sampling else 0)):
        ids = shuffled_rows(position, rl.prompts_per_step, 0, len(rows))
        position += rl.prompts_per_step
        info["prompt_ids"] += ids  # every prompt drawn (all ranks'), in stream order
        mine = [rows[i] for i in P.split_for_data_parallel(ids)]
        groups, truncated = generate_and_share(engine, tok, mine, sampling, tools, share=not alone)
        counts = score(groups, pool, rl, sampling.max_new_tokens)
        info["prompts"] += len(groups)
        info["truncated"] += truncated
        info["reward_errors"] += counts["errors"]
        info["reward_timeouts"] += counts["timeouts"]
        good = {id(g) for g in (informative(groups) if rl.dynamic_sampling else groups)}
        keep += [g for g in groups if id(g) in good]
        dropped += [g for g in groups if id(g) not in good]
        if len(keep) >= want if alone else P.all_ranks_true(len(keep) >= want):
            break
    groups = (keep + dropped)[:want]
    info["informative_frac"] = len(informative(groups)) / max(len(groups), 1)
    return RolloutBatch.of(groups, seq_len, tok.pad_token_id, info), position


def _forward(
    vocab: int,
    temperature: float,
    settings: LossSettings | None,
    chunk_tokens: int = CHUNK_TOKENS,
    oracle: bool = False,
    routes: str | None = None,
):
    """megatron forward step: per-token log-probs and entropy; the RL loss when `settings` is given,
    else (a scoring pass) the log-probs and entropy as data. With `oracle`, also the log-probs of the
    engine's top tokens (batch["engine_top_ids"]) as data "top_logp": the mismatch oracle's trainer side.
    `routes` (MoE, batch["routed_experts"]: the engine's experts per token): "replay" routes every token to
    them; "record" lets the routers choose and counts, per layer, the completion tokens routed alike
    ("route_match_{layer}" of "route_tokens"); within parallel.routing_replay.routing(policy, ...).

    The model's last stage applies its output layer `chunk_tokens` tokens at a time (head_logprobs), so
    a micro-batch's full [b, s, vocab] fp32 logits never exist; earlier stages return hidden states.
    Multi-token-prediction layers take no part (without_mtp)."""

    def forward(batch, model):
        if routes == "replay":
            routing_replay.feed(model, batch["routed_experts"])
        candidates = batch["engine_top_ids"] if oracle else None
        request = LogprobRequest(batch["labels"], vocab, temperature, chunk_tokens, candidates=candidates)
        with without_mtp(unwrap(model)):
            out = model(
                batch["tokens"],
                batch["position_ids"],
                batch["attention_mask"],
                output_processor=head_logprobs,
                output_processor_context=request,
            )

        def loss_fn(out):
            logp, token_ent = out[:2]
            mask = batch["loss_mask"]
            extra = {"top_logp": out[2]} if oracle else {}  # what the pass measures besides
            if routes == "record":
                matches = routing_replay.agreement(model, batch["routed_experts"], mask)
                extra |= {f"route_match_{i}": m for i, m in enumerate(matches)} | {"route_tokens": mask.sum()}
            ent = (token_ent * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            if settings is None:
                zero = logp.sum() * 0
                return zero, torch.tensor(1, dtype=torch.int), {"logp": logp.detach(), "entropy": ent.sum(), **extra}
            loss_sum, count, m = rl_loss(logp, batch, settings)
            count = count.to(torch.int)
            data = {"loss": torch.stack([loss_sum.detach(), count.float()]), "entropy": ent.sum(), **m}
            if "old_logp" not in batch:  # an on-policy update: these are the old log-probs (rl_loss)
                data |= {"logp": logp.detach(), **extra}
            return loss_sum, count, data

        return out, loss_fn

    return forward


@dataclass
class Scored:
    """A scoring pass's results: per-token log-probs [rows, seq] (on the last pipeline stage; zeros
    elsewhere), the summed per-sequence entropy, and what the pass was asked to measure besides."""

    logp: torch.Tensor
    entropy: float
    top_logp: torch.Tensor | None = None  # the engine's top tokens' [rows, seq, k] (rlhf.consistency)
    route_agreement: list[float] | None = None  # per MoE layer, the share of tokens routed as the engine did


@torch.no_grad()
def scoring_pass(
    policy: Policy, batch: dict, micro: int, temperature: float, oracle: bool = False, routes: str | None = None
) -> Scored:
    """Every row under `policy`; `oracle` and `routes` as in _forward."""
    mbs, parts = _trimmed(policy, batch, list(range(batch["tokens"].shape[0])), micro)
    with eval_mode(policy), routing_replay.routing(policy, routes):
        fwd = _forward(policy.cfg.model.vocab_size, temperature, None, oracle=oracle, routes=routes)
        data = forward_backward(policy, mbs, forward_only=True, forward=fwd)
    entropy = P.reduce_sums(data, ["entropy"])["entropy"]
    # Only the last pipeline stage computes log-probs, and only it reads them; zeros keep shapes elsewhere.
    out = Scored(scatter_rows([d["logp"] for d in data], parts, batch["loss_mask"]), entropy)
    if oracle:
        out.top_logp = _top_logp(data, parts, batch)
    if routes == "record":
        out.route_agreement = _route_agreement(data, batch)
    return out


def logprobs(policy: Policy, batch: dict, micro: int, temperature: float) -> tuple[torch.Tensor, float]:
    """(per-token log-probs, summed entropy) of every row under `policy` (scoring_pass without the extras)."""
    scored = scoring_pass(policy, batch, micro, temperature)
    return scored.logp, scored.entropy


def _top_logp(data: list[dict], parts: list[list[int]], batch: dict) -> torch.Tensor:
    """The micro-batches' "top_logp" back in the batch's row order, shaped as its engine_top_logp."""
    return scatter_rows([d["top_logp"] for d in data], parts, batch["engine_top_logp"])


def _route_agreement(data: list[dict], batch: dict) -> list[float]:
    """Per MoE layer, the share of all ranks' completion tokens the policy routed as the engine did."""
    keys = [f"route_match_{i}" for i in range(batch["routed_experts"].shape[2])]
    sums = P.reduce_sums(data, [*keys, "route_tokens"])
    return [sums[k] / max(sums["route_tokens"], 1) for k in keys]


def _trimmed(policy: Policy, batch: dict, rows: list[int], micro: int):
    """`rows` in length-sorted micro-batches, each only as long as its longest row, of `micro` rows or
    filled to stage.train.micro_batch_tokens (core.data)."""
    p, budget = policy.cfg.parallel, policy.cfg.stage.train.micro_batch_tokens
    return trimmed_micro_batches(batch, rows, micro, multiple=p.tensor if p.sequence_parallel else 1, max_tokens=budget)


@phase("update")
def update(
    policy: Policy,
    batch: dict,
    settings: LossSettings,
    minibatches: int,
    micro: int,
    temperature: float,
    oracle: bool = False,
    routes: str | None = None,
) -> dict:
    """rl.minibatches optimizer steps over disjoint shares of the batch; returns averaged metrics.

    A batch without old_logp is updated exactly on-policy (one minibatch: the weights that score the
    samples are those that will be updated), so the update's own forward gives the old log-probs; they
    come back as "old_logp" (on the last pipeline stage; zeros elsewhere), for the step's metrics, and
    with `oracle` the engine's top tokens' as "trainer_top_logp", with routes="record" the routing
    agreement as "route_agreement". routes="replay" replays the engine's experts in every minibatch."""
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
    on_policy = "old_logp" not in batch
    routes = routes if routes == "replay" or on_policy else None  # recording measures the old pass only
    fwd = _forward(policy.cfg.model.vocab_size, temperature, settings, oracle=oracle and on_policy, routes=routes)
    for k in range(minibatches):
        policy.optimizer.zero_grad()
        mbs, parts = _trimmed(policy, batch, list(range(k * size, (k + 1) * size)), micro)
        with routing_replay.routing(policy, routes):
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
    if on_policy:  # one minibatch: `data` and `parts` cover every row
        out["old_logp"] = scatter_rows([d["logp"] for d in data], parts, batch["loss_mask"])
        if oracle:
            out["trainer_top_logp"] = _top_logp(data, parts, batch)
        if routes == "record":
            out["route_agreement"] = _route_agreement(data, batch)
    return out
