"""Rollouts as training data: engine completions → samples → fixed-length token batches.

Position i of a batch row predicts token i+1; loss_mask marks the positions whose label is a
completion token, and the per-token fields (engine_logp, later old_logp, ref_logp) line up with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.data import causal_mask
from inference.engine import Engine, Sampling


@dataclass
class Sample:
    row: dict  # the prompt row: prompt, answer, task, metadata
    prompt_ids: list[int]
    completion_ids: list[int]
    engine_logp: list[float]
    finish_reason: str
    text: str = ""
    rewards: dict[str, float] = field(default_factory=dict)
    reward: float = 0.0


def generate_groups(engine: Engine, tok, rows: list[dict], sampling: Sampling) -> tuple[list[list[Sample]], int]:
    """sampling.n completions for each row; returns the groups and how many prompts were truncated."""
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    out = engine.generate(prompts, sampling)  # under the engine's own watch: timeout_s, death, one restart
    groups = []
    for row, prompt, comps in zip(rows, prompts, out.completions):
        groups.append(
            [
                Sample(
                    row,
                    prompt,
                    c.token_ids,
                    c.logprobs,
                    c.finish_reason,
                    tok.decode(c.token_ids, skip_special_tokens=True),
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
        engine_logp[i, start:end] = torch.tensor(s.engine_logp[: end - start])
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "engine_logp": engine_logp,
        "position_ids": torch.arange(seq_len).expand(n, seq_len),
    }


def micro_batches(batch: dict[str, torch.Tensor], rows: list[int], micro: int) -> list[dict]:
    """Rows of `batch` in micro-batches of `micro`, each with the causal mask megatron expects."""
    out = []
    for i in range(0, len(rows), micro):
        idx = torch.tensor(rows[i : i + micro])
        mb = {k: v[idx] for k, v in batch.items()}
        mb["attention_mask"] = causal_mask(mb["tokens"].shape[1])
        out.append(mb)
    return out
