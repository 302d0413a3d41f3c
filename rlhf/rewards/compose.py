"""What scores a GRPO step's samples: the rule pool (rlhf.rewards.pool) alone, or, with reward.models, that
pool mixed with trained reward models (R1 stage 4, all-scenario RL).

Reasoning prompts (rows with a gold answer) get reward.weights' rule rewards. General prompts (no gold:
data.general_task's rows, rlhf.prompts.is_general) get reward.general_weights' rule rewards (format) plus
each reward model's score times its weight. A reward model reads what it was trained on, recorded in its
checkpoint (stage.view): R1's helpfulness model the summary only, its harmlessness model the whole response.
GRPO normalises rewards within a prompt's group, so the two kinds' scales never meet.
"""

from __future__ import annotations

import contextlib
import math

import torch

from core.config import Config
from core.data import micro_batches
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from parallel.policy import eval_mode
from parallel.step import forward_backward
from rlhf.prompts import is_general
from rlhf.reward_model import encode, scored_rows, view
from rlhf.rewards import RewardPool, RewardResult

NOT_SCORED = math.nan  # a reward that does not apply to a sample (step metrics average the others)


def training_rewards(cfg: Config, tok):
    """The scorer of the GRPO loop: the rule pool, or with reward.models the mixed scorer below."""
    r = cfg.reward
    if not r.models:
        return RewardPool(dict(r.weights), r.timeout_s, r.workers)
    return MixedRewards(cfg, tok)


class RewardModel:
    """A trained reward model (stage=reward_model) at the policy's parallel layout, with the view it reads."""

    def __init__(self, cfg: Config, key: str, path: str, tok):
        self.model, meta = ckpt.load_frozen(cfg, path, "scalar", key, tok)
        seen = meta.get("extra", {}).get("view") or {"part": "full", "reasoning_end": "</think>"}
        self.part, self.reasoning_end, self.tok = seen["part"], seen["reasoning_end"], tok
        self.micro = cfg.stage.train.micro_batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Collective over the model-parallel group, which must pass the same rows; every rank gets the scores."""
        ids = [encode(self.tok, p, view(r, self.part, self.reasoning_end)) for p, r in zip(prompts, responses)]
        data = scored_rows([[x] for x in ids], max(len(x) for x in ids), self.tok.pad_token_id, segments=1)
        with eval_mode(self.model):
            out = forward_backward(
                self.model, micro_batches(data, list(range(len(ids))), self.micro), forward_only=True, forward=_at_eos
            )
        scores = torch.cat([d["scores"] for d in out]) if out else torch.zeros(len(ids))
        return P.from_last_stage(scores).tolist()


def _at_eos(batch: dict, model):
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    def loss_fn(o):
        scores = o[..., 0].float().gather(1, batch["ends"])[:, 0]
        return scores.sum() * 0, torch.tensor(1, dtype=torch.int), {"scores": scores.detach()}

    return out, loss_fn


class MixedRewards(contextlib.ExitStack):
    """RewardPool's score() for mixed prompts (module docstring); a reward that does not apply is NaN."""

    def __init__(self, cfg: Config, tok):
        super().__init__()
        r = cfg.reward
        self.rule = RewardPool(dict(r.weights), r.timeout_s, r.workers)
        self.general = RewardPool(dict(r.general_weights), r.timeout_s, r.workers) if r.general_weights else None
        self.models = {
            name: (RewardModel(cfg, f"reward.models.{name}.path", m.path, tok), m.weight)
            for name, m in r.models.items()
        }

    def __enter__(self):
        super().__enter__()
        for pool in (self.rule, self.general):
            if pool is not None:
                self.enter_context(pool)
        return self

    def score(self, completions: list[str], samples: list[dict]) -> RewardResult:
        n = len(samples)
        names = [*self.rule.weights, *(self.general.weights if self.general else ()), *(f"rm_{k}" for k in self.models)]
        out = RewardResult([0.0] * n, {k: [NOT_SCORED] * n for k in dict.fromkeys(names)}, {}, {})
        general = [i for i in range(n) if is_general(samples[i])]
        reasoning = [i for i in range(n) if not is_general(samples[i])]
        for pool, rows in ((self.rule, reasoning), (self.general, general)):
            if pool is not None and rows:
                self._merge(out, rows, pool.score([completions[i] for i in rows], [samples[i] for i in rows]))
        if general:  # the same rows on every model-parallel rank (grpo.generate_and_share): a safe collective
            for name, (model, weight) in self.models.items():
                scores = model.score([samples[i]["prompt"] for i in general], [completions[i] for i in general])
                for i, v in zip(general, scores):
                    out.per_reward[f"rm_{name}"][i] = v
                    out.total[i] += weight * v
        return out

    @staticmethod
    def _merge(out: RewardResult, rows: list[int], part: RewardResult) -> None:
        for k, vals in part.per_reward.items():
            for i, v in zip(rows, vals):
                out.per_reward[k][i] = v
        for i, v in zip(rows, part.total):
            out.total[i] += v
        for counts, more in ((out.errors, part.errors), (out.timeouts, part.timeouts)):
            for k, v in more.items():
                counts[k] = counts.get(k, 0) + v
