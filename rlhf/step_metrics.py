"""What a GRPO step reports: the metrics.jsonl row (the same keys go to W&B) and its phase timings."""

from __future__ import annotations

import math
import time

import torch

from parallel import parallelize as P


class StepClock:
    """Wall time per phase of a step: lap("rollout") closes the phase that ran since the last lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.cpu_start = time.process_time()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def step_metrics(step: int, batch, stats: dict, sync: dict, clock: StepClock) -> dict:
    """Global (all DP ranks) metrics of one step (its rlhf.rollout.RolloutBatch, the update's stats, the
    weight sync's); every rank returns the same row."""
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
    if batch.teacher_logp is not None:  # on-policy distillation: the k1 estimate of KL(student‖teacher) per token
        sums["reverse_kl"] = float(((batch.old_logp - batch.teacher_logp) * mask).sum())
    g = P.reduce_sums([{k: torch.tensor(float(v)) for k, v in sums.items()}], list(sums))
    # old_logp exists only where the outputs are computed: zeros elsewhere would fake a gap of 0
    peak = P.max_over_world([float(diff.max()) if P.is_last_pipeline_stage() else 0.0, float(lengths.max())])
    n, step_s = max(g["samples"], 1), time.perf_counter() - clock.start
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
        "perf/rollout_s": clock.phases.get("rollout", 0.0),
        "perf/train_s": clock.phases.get("train", 0.0),
        "perf/cpu_s": time.process_time() - clock.cpu_start,
        "perf/sequence_tokens": g["sequence_tokens"],  # model-FLOP counts (tools.bench): unpadded tokens
        "perf/sequence_tokens_sq": g["sequence_tokens_sq"],  # and the causal attention's Σ length²
        "sync/seconds": sync["seconds"],
        "sync/mb": sync["bytes"] / 2**20,
    }
    if "reverse_kl" in g:
        row["distill/reverse_kl"] = g["reverse_kl"] / max(g["tokens"], 1)
    return row
