"""Rollouts as training data: engine completions → samples → a step's RolloutBatch.

Position i of a batch row predicts token i+1; loss_mask marks the positions whose label is a
completion token the policy sampled (not a tool's output, rlhf.tool_calls), and the per-token fields
(engine_logp, advantages, old_logp, ref_logp) line up with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from inference.engine import Engine, Sampling
from rlhf.prompts import prompt_ids
from rlhf.tool_calls import ToolRunner

SEED_STRIDE = 1_000_003  # sampling seeds are seed × SEED_STRIDE + offset: no two calls of a run share one


@dataclass
class Sample:
    row: dict  # the prompt row: prompt, answer, task, metadata
    prompt_ids: list[int]
    completion_ids: list[int]
    engine_logp: list[float]
    finish_reason: str
    text: str = ""
    rewards: dict[str, float] = field(default_factory=dict)  # per reward; NaN where one does not apply
    reward: float = 0.0  # the weighted total the advantage estimator reads
    advantage: float = 0.0  # a group estimator's advantage for the whole sample
    version: int = 0  # the weights that generated it: the trainer's version after that many steps
    # Per completion token, where partial rollouts (rlhf.partial) continued it on newer weights; `version`
    # is then the oldest.
    token_versions: list[int] = field(default_factory=list)
    # Per completion token, the engine's most likely ids and their log-probs [tokens, k]
    # (rollout.consistency=topk; else None): the mismatch oracle's engine side (rlhf.consistency).
    top_ids: torch.Tensor | None = field(default=None, compare=False)
    top_logprobs: torch.Tensor | None = field(default=None, compare=False)
    # MoE with routing recorded: the engine's experts at every input position of the trainer's forward
    # (prompt and completion but the last token) [positions, MoE layers, top-k] (parallel.routing_replay)
    routed_experts: torch.Tensor | None = field(default=None, compare=False)
    # Tool-integrated rollouts (rlhf.tool_calls): per completion token, 1 where the tool wrote it (out of the
    # loss, the KL and the lengths); each call's outcome. Empty without a tool.
    tool_mask: list[int] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)

    @property
    def policy_tokens(self) -> int:
        """The completion tokens the policy sampled (the tool's left out): the sample's length."""
        return len(self.completion_ids) - sum(self.tool_mask)


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank: the samples by prompt group, their token tensors [samples,
    seq_length], and the per-token fields the step fills in order (advantages, then old/ref log-probs)."""

    groups: list[list[Sample]]
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    engine_logp: torch.Tensor  # the behaviour policy's, as the engine sampled
    # rollout.consistency=topk: the engine's k most likely ids at each position [samples, seq_length, k],
    # their log-probs, and the trainer's log-probs of the same ids (set with old_logp)
    engine_top_ids: torch.Tensor | None = None
    engine_top_logp: torch.Tensor | None = None
    trainer_top_logp: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None  # the samples' routed_experts [samples, seq_length, layers, k]
    route_agreement: list[float] | None = None  # per MoE layer, the share routed alike (set with old_logp)
    advantages: torch.Tensor | None = None  # stage.rl.advantage's estimate
    old_logp: torch.Tensor | None = None  # the trainer's before the update: the clipping anchor
    ref_logp: torch.Tensor | None = None  # the KL reference's
    teacher_logp: torch.Tensor | None = None  # on-policy distillation's teacher's
    info: dict = field(default_factory=dict)  # rollout counts: prompts, truncated, reward errors, ...

    @classmethod
    def of(cls, groups: list[list[Sample]], seq_len: int, pad_id: int, info: dict | None = None) -> RolloutBatch:
        return cls(groups, **to_batch([s for g in groups for s in g], seq_len, pad_id), info=info or {})

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-token fields that are set, by name: what micro-batches and the loss read."""
        return {f.name: v for f in fields(self) if torch.is_tensor(v := getattr(self, f.name))}


def sampling(r, seed: int, offset: int, stop_token_ids: tuple[int, ...], **overrides) -> Sampling:
    """rollout config `r`'s sampling for one call of a run (`offset`: its step or chunk); `overrides`
    replace fields (n, max_new_tokens)."""
    base = dict(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        min_new_tokens=r.min_new_tokens,
    )
    return Sampling(**{**base, **overrides}, seed=seed * SEED_STRIDE + offset, stop_token_ids=stop_token_ids)


def generate_groups(
    engine: Engine, tok, rows: list[dict], sampling: Sampling, tools: ToolRunner | None = None
) -> tuple[list[list[Sample]], int]:
    """sampling.n completions for each row, calling `tools` where they call it (rlhf.tool_calls); returns
    the groups and how many prompts were truncated. A sample's prompt is the one the engine sampled after
    (rollout.overlong_prompt=truncate: its tail), so the trainer scores the completion in the context that
    produced it."""
    prompts = [prompt_ids(tok, r) for r in rows]
    # under the engine's own watch (deadline, restart)
    out = engine.generate(prompts, sampling) if tools is None else tools.generate(engine, prompts, sampling)
    groups = []
    for row, prompt, comps in zip(rows, out.prompts, out.completions):
        groups.append(
            [
                Sample(
                    row,
                    prompt,
                    c.token_ids,
                    c.logprobs,
                    c.finish_reason,
                    tok.decode(c.token_ids, skip_special_tokens=True),
                    token_versions=c.token_versions,
                    top_ids=c.top_ids,
                    top_logprobs=c.top_logprobs,
                    routed_experts=c.routed_experts,
                    tool_mask=c.tool_mask,
                    tool_calls=c.tool_calls,
                )
                for c in comps
            ]
        )
    return groups, len(out.truncated_prompts)


def to_batch(samples: list[Sample], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    n = len(samples)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_len)
    engine_logp = torch.zeros(n, seq_len)
    for i, s in enumerate(samples):
        full = (s.prompt_ids + s.completion_ids)[: seq_len + 1]
        if len(s.prompt_ids) + len(s.completion_ids) > seq_len + 1:
            raise ValueError(
                f"sample {i}: prompt+completion {len(full)} tokens > seq_length+1={seq_len + 1}. "
                "Fix: raise stage.train.seq_length or lower rollout.max_new_tokens."
            )
        tokens[i, : len(full) - 1] = torch.tensor(full[:-1])
        labels[i, : len(full) - 1] = torch.tensor(full[1:])
        start, end = len(s.prompt_ids) - 1, len(full) - 1
        loss_mask[i, start:end] = 1
        if s.tool_mask:  # the tool's tokens are context, not actions
            loss_mask[i, start:end] -= torch.tensor(s.tool_mask[: end - start], dtype=loss_mask.dtype)
        engine_logp[i, start:end] = torch.tensor(s.engine_logp[: end - start])
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "engine_logp": engine_logp,
        "position_ids": torch.arange(seq_len).expand(n, seq_len),
        **_top_logprobs(samples, seq_len),
        **_routes(samples, seq_len),
    }


def _carried(samples: list[Sample], name: str) -> bool:
    """Whether the samples carry the per-token field `name`: all of those with a completion, or none (one
    engine call gives it to every completion)."""
    have = [getattr(s, name) is not None for s in samples if s.completion_ids]
    if any(have) and not all(have):
        raise ValueError(f"some samples carry the engine's {name} and some do not: one engine call mixed them")
    return any(have)


def _routes(samples: list[Sample], seq_len: int) -> dict[str, torch.Tensor]:
    """The engine's experts per position as the batch lays tokens out. Padding positions route to experts
    0..k-1: the replaying router needs k distinct experts for every token, and no loss reads them."""
    if not _carried(samples, "routed_experts"):
        return {}
    layers, k = next(s.routed_experts for s in samples if s.routed_experts is not None).shape[1:]
    routes = torch.arange(k, dtype=torch.int16).expand(len(samples), seq_len, layers, k).clone()
    for i, s in enumerate(samples):
        if s.routed_experts is not None:
            n = min(len(s.routed_experts), seq_len)
            routes[i, :n] = s.routed_experts[:n]
    return {"routed_experts": routes}


def _top_logprobs(samples: list[Sample], seq_len: int) -> dict[str, torch.Tensor]:
    """The engine's top ids and log-probs laid out as the batch's positions, when the samples carry them."""
    if not _carried(samples, "top_ids"):
        return {}
    k = next(s.top_ids for s in samples if s.top_ids is not None).shape[1]
    ids = torch.zeros(len(samples), seq_len, k, dtype=torch.int32)
    logp = torch.zeros(len(samples), seq_len, k)
    for i, s in enumerate(samples):
        if s.top_ids is not None:
            start = len(s.prompt_ids) - 1
            end = min(start + len(s.top_ids), seq_len)
            ids[i, start:end] = s.top_ids[: end - start]
            logp[i, start:end] = s.top_logprobs[: end - start]
    return {"engine_top_ids": ids, "engine_top_logp": logp}
