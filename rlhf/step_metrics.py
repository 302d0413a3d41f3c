"""What a GRPO step reports: the metrics.jsonl row (the same keys go to W&B). Its time/ entries, the
ledger of where the step's wall time went, join it in rlhf.loop.LoopShell.end_step (core.ledger)."""

from __future__ import annotations

import hashlib
import math
import time

import torch

from core.ledger import Ledger
from parallel import parallelize as P
from rlhf.consistency import oracle
from rlhf.tool_calls import tool_counts, tool_metrics

TRAIN_PHASES = ("advantage", "logprobs_old", "logprobs_ref", "logprobs_teacher", "update")


RECEIPT_KEYS = ("version", "transfer_s", "load_s", "post_s", "probe_gap")


def step_metrics(step: int, batch, stats: dict, sync: dict, ledger: Ledger, rollout, vocab_size: int) -> dict:
    """Global (all DP ranks) metrics of one step (its rlhf.rollout.RolloutBatch, the update's stats, the
    weight sync's, the step's ledger so far; the rollout config's consistency checks); every rank returns
    the same row. The mismatch oracle stops the run here (rlhf.consistency.ConsistencyError)."""
    samples, groups, info = batch.samples, batch.groups, batch.info
    mask = batch.loss_mask
    lengths = mask.sum(-1)
    diff = (batch.old_logp - batch.engine_logp).abs() * mask
    seq_log_ratio = ((batch.old_logp - batch.engine_logp) * mask).sum(-1)
    names = sorted({k for s in samples for k in s.rewards})
    sums = {
        "samples": len(samples),
        "reward": sum(s.reward for s in samples),
        "length": float(lengths.sum()),
        "tokens": float(mask.sum()),
        # What a step computes on, padding excluded: the prompt and completion of every sample
        "sequence_tokens": sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples),
        "sequence_tokens_sq": sum((len(s.prompt_ids) + len(s.completion_ids)) ** 2 for s in samples),
        "diff": float(diff.sum()),
        "seq_ratio": float(torch.exp(seq_log_ratio).sum()),
        "finish_length": sum(s.finish_reason == "length" for s in samples),
        "prompts": info["prompts"],
        "truncated": info["truncated"],
        "reward_errors": info["reward_errors"],
        "reward_timeouts": info["reward_timeouts"],
        "informative": info["informative_frac"] * len(groups),
        "groups": len(groups),
        # NaN: a reward that does not apply to the sample (a reward model's score on a reasoning prompt)
        **{f"r_{n}": sum(v for s in samples if not math.isnan(v := s.rewards.get(n, math.nan))) for n in names},
        **{f"c_{n}": sum(not math.isnan(s.rewards.get(n, math.nan)) for s in samples) for n in names},
    }
    if rollout.max_tool_calls:
        sums.update({f"tool_{k}": v for k, v in tool_counts(samples).items()})
    if batch.teacher_logp is not None:  # on-policy distillation: the k1 estimate of KL(student‖teacher) per token
        sums["reverse_kl"] = float(((batch.old_logp - batch.teacher_logp) * mask).sum())
    g = P.reduce_sums([{k: torch.tensor(float(v)) for k, v in sums.items()}], list(sums))
    # old_logp exists only where the outputs are computed: zeros elsewhere would fake a gap of 0
    peak = P.max_over_world([float(diff.max()) if P.is_last_pipeline_stage() else 0.0, float(lengths.max())])
    n, step_s, phases = max(g["samples"], 1), ledger.elapsed(), ledger.seconds
    row = {
        "step": step,
        "reward/mean": g["reward"] / n,
        **{f"reward/{name}": g[f"r_{name}"] / g[f"c_{name}"] if g[f"c_{name}"] else None for name in names},
        "reward/errors": g["reward_errors"],
        "reward/timeouts": g["reward_timeouts"],
        "response_length/mean": g["length"] / n,
        "response_length/max": float(peak[1]),
        "response_length/clip_frac": g["finish_length"] / n,
        "train/loss": stats.get("loss"),
        "train/kl": stats.get("kl"),
        "train/entropy": stats.get("entropy"),
        "train/clip_frac": stats.get("clip_frac"),
        "train/grad_norm": stats.get("grad_norm"),
        "train/lr": stats.get("lr"),
        "train/skipped": not stats["update_ok"],
        "rollout/logprob_diff_mean": g["diff"] / max(g["tokens"], 1),
        "rollout/logprob_diff_max": float(peak[0]),
        "rollout/seq_importance_ratio": g["seq_ratio"] / n,
        "rollout/prompts": g["prompts"],
        "rollout/truncated_prompts": g["truncated"],
        "rollout/informative_frac": g["informative"] / max(g["groups"], 1),
        "perf/step_s": step_s,
        "perf/samples_per_s": n / step_s,
        "perf/tokens_per_s": g["tokens"] / step_s,
        "perf/rollout_s": phases["generation"] + phases["tools"] + phases["reward"],
        "perf/train_s": sum(phases[k] for k in TRAIN_PHASES),
        "perf/cpu_s": time.process_time() - ledger.cpu_start,
        "perf/sequence_tokens": g["sequence_tokens"],  # model-FLOP counts (tools.bench): unpadded tokens
        "perf/sequence_tokens_sq": g["sequence_tokens_sq"],  # and the causal attention's Σ length²
        "sync/seconds": sync["seconds"],
        "sync/mb": sync["bytes"] / 2**20,
        # the engine's receipt (inference.refit): the weight version it serves, its transfer/load/re-pack time
        **{f"sync/{k}": v for k, v in sync.get("receipt", {}).items() if k in RECEIPT_KEYS},
    }
    if rollout.consistency == "off":
        for key in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/seq_importance_ratio"):
            del row[key]
    if batch.trainer_top_logp is not None:
        row.update(oracle(batch, vocab_size, rollout.max_new_tokens, rollout.consistency_max_kl, step))
    if batch.route_agreement is not None:  # MoE, routing recorded: per layer, the tokens routed as the engine did
        agreement = batch.route_agreement
        row["consistency/routing_agreement"] = sum(agreement) / len(agreement)
        row.update({f"consistency/routing_agreement_moe{i}": a for i, a in enumerate(agreement)})
    if rollout.max_tool_calls:
        row.update(tool_metrics({k[5:]: v for k, v in g.items() if k.startswith("tool_")}, g["samples"]))
    if "reverse_kl" in g:
        row["distill/reverse_kl"] = g["reverse_kl"] / max(g["tokens"], 1)
    row.update(staleness_metrics(info, step_s))
    # What the step trained on, for checking that a resumed run repeats an uninterrupted one exactly
    row["rollout/prompt_ids"] = info["prompt_ids"]
    shares = P.gather_data_parallel(hashlib.sha256(batch.tokens.numpy().tobytes()).hexdigest())
    row["rollout/tokens_sha256"] = (
        shares[0] if len(shares) == 1 else hashlib.sha256("".join(shares).encode()).hexdigest()
    )
    return row


def staleness_metrics(info: dict, step_s: float) -> dict:
    """How many weight versions each sample lags the weights it trains (rlhf.producer): the mean, the
    maximum and a count per lag; and how long the engine worked and idled since the previous step's row
    (an overlapped engine works while the trainer does; a synchronous one only when the trainer waits).
    With partial rollouts a sample's lag is its oldest token's; `continued` counts the samples finished on
    newer weights than they began on, and the token-level mean lag shows what continuing saved."""
    lags = info["staleness"]
    row = {
        "rollout/staleness_mean": sum(lags) / max(len(lags), 1),
        "rollout/staleness_max": max(lags, default=0),
        **{f"rollout/staleness_{k}": lags.count(k) for k in range(info["lead"] + 1)},
        "rollout/continued": info["continued"],
        "perf/engine_busy_s": info["engine_busy_s"],
    }
    if info["token_staleness_mean"] is not None:
        row["rollout/token_staleness_mean"] = info["token_staleness_mean"]
    row["perf/engine_idle_s"] = max(step_s - info["engine_busy_s"], 0.0)
    return row
