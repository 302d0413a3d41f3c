"""The layout and workload the planner reads off a validated `Config`: group sizes, which links each group
uses, and how many tokens each step, mini-batch and micro-batch carries."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import Config
from core.stages import RL_STAGES
from tools.plan.arch import Stage, stages


@dataclass(frozen=True)
class Layout:
    world: int  # training GPUs
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    edp: int  # data parallel size of the expert weights
    gpn: int  # GPUs per node
    stages: tuple[Stage, ...]
    dualpipe: bool

    def inter_node(self, span: int) -> bool:
        """Whether a group spread over `span` consecutive ranks leaves the node."""
        return span > self.gpn

    @property
    def ep_nodes(self) -> int:
        return math.ceil(self.ep * self.etp / self.gpn)

    def rank_stages(self, r: int) -> tuple[Stage, ...]:
        """The stages pipeline rank r holds: one, or under DualPipe stage r and stage pp-1-r."""
        if self.dualpipe and self.pp > 1:
            return (self.stages[r], self.stages[self.pp - 1 - r])
        return (self.stages[r],)


@dataclass(frozen=True)
class Workload:
    kind: str  # pretrain | grpo
    samples: int  # sequences per optimizer step (pretrain) or per RL step
    prompt: int  # mean prompt tokens (pretrain: 0)
    response: int  # mean generated tokens (pretrain: the sequence)
    max_response: int  # the generation cap
    minibatches: int  # optimizer steps per RL step (pretrain: 1)
    micro_tokens: int  # tokens of a micro-batch, at most (memory)
    logprob_passes: int  # forward passes before training: old policy, reference
    ctx: float  # mean attended positions per token, causal within each sequence
    packed: bool = False  # micro-batches packed to micro_tokens (dynamic batching) rather than counted in samples

    @property
    def seq(self) -> int:
        return self.prompt + self.response

    @property
    def tokens(self) -> int:
        return self.samples * self.seq

    def micro_batches(self, dp: int, micro_batch_size: int) -> tuple[int, float]:
        """(micro-batches per data-parallel rank per mini-batch, mean tokens each)."""
        per_rank = self.tokens / self.minibatches / dp
        if self.packed:
            m = max(1, math.ceil(per_rank / self.micro_tokens))
        else:
            m = max(1, math.ceil(self.samples / self.minibatches / dp / micro_batch_size))
        return m, per_rank / m


def workload(cfg: Config) -> Workload:
    t, pl, r = cfg.stage.train, cfg.plan, cfg.rollout
    kind = pl.workload if pl.workload != "auto" else ("grpo" if cfg.stage.name in RL_STAGES else "pretrain")
    packed = pl.micro_batch_tokens is not None
    micro = pl.micro_batch_tokens or t.micro_batch_size * t.seq_length
    if kind == "pretrain":
        s = t.seq_length
        return Workload("pretrain", t.global_batch_size, 0, s, s, 1, micro, 0, (s + 1) / 2, packed)
    prompt = pl.prompt_tokens if pl.prompt_tokens is not None else t.seq_length - r.max_new_tokens
    response = pl.response_tokens if pl.response_tokens is not None else r.max_new_tokens
    s = prompt + response
    passes = 1 + (cfg.stage.rl.kl_coef > 0)
    return Workload(
        "grpo",
        cfg.stage.rl.prompts_per_step * r.n,
        prompt,
        response,
        r.max_new_tokens,
        cfg.stage.rl.minibatches,
        micro,
        passes,
        (s + 1) / 2,
        packed,
    )


def layout(cfg: Config, world: int) -> Layout:
    p = cfg.parallel
    etp = p.expert_tensor or p.tensor
    return Layout(
        world=world,
        tp=p.tensor,
        pp=p.pipeline,
        cp=p.context,
        ep=p.expert,
        etp=etp,
        dp=p.data,
        edp=world // (p.pipeline * p.expert * etp),
        gpn=cfg.cluster.gpus_per_node or 8,
        stages=tuple(stages(cfg)),
        dualpipe=cfg.plan.schedule == "dualpipe",
    )
