"""The `r1_zero` stage: GRPO on a base model with rule rewards, rollouts from the colocated engine. The same
loop runs reasoning_rl (R1 stage 2), general_rl (stage 4, with reward models: rlhf.rewards.compose) and
on_policy_distill (stage.rl.advantage=teacher: per-token advantages from a teacher).

    python -m rlhf.train stage=r1_zero stage.init_from=runs/demo/pretrain run_dir=runs/demo/r1_zero

Each step: sample G completions for each prompt and score them → advantages → the trainer's log-probs
(old, reference) → rl.minibatches clipped-ratio updates → weights to the engine. A killed run resumes from
run_dir/checkpoints with the same prompt stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.config import Config
from core.errors import ConfigError
from core.ledger import phase
from core.run_tokenizer import run_tokenizer, stop_token_ids
from inference import colocated
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from parallel.policy import build_policy
from parallel.routing_replay import route_mode
from rlhf import grpo, refit_probe
from rlhf.advantages import ADVANTAGES, AdvantageContext
from rlhf.evaluate import SCORES, eval_records, summarize
from rlhf.judge import refuse_judged
from rlhf.loop import LoopShell
from rlhf.losses import LossSettings
from rlhf.producer import RolloutProducer
from rlhf.prompts import load_prompts
from rlhf.rewards import RewardPool
from rlhf.rewards.compose import training_rewards
from rlhf.rollout import sampling
from rlhf.step_metrics import step_metrics
from rlhf.tool_calls import ToolRunner

log = logging.getLogger("r1stack.r1_zero")


def run(cfg: Config) -> dict:
    env = P.init_distributed(cfg)
    try:
        return train(cfg, env.rank == 0)
    finally:
        P.shutdown()


def train(cfg: Config, rank0: bool) -> dict:
    rl, t, r, run_dir = cfg.stage.rl, cfg.stage.train, cfg.rollout, Path(cfg.run_dir)
    tok = run_tokenizer(cfg, run_dir=run_dir, write=rank0)
    train_rows, eval_rows = (load_prompts(cfg.data, split, tok, cfg.reward.answer) for split in ("train", "eval"))
    refuse_judged(train_rows + eval_rows, f"stage={cfg.stage.name}")
    routes = route_mode(cfg)  # MoE: replay the engine's experts, or record ours against them
    policy = build_policy(cfg, train_mtp=False, routing_replay=routes is not None)  # RL trains no MTP
    position, evals, step_dir = start_from(cfg, policy, run_dir)
    ref = reference(cfg, policy, run_dir) if rl.kl != "none" and rl.kl_coef > 0 else None  # β=0: no KL term
    teacher = ckpt.load_frozen(cfg, rl.teacher, "lm", "stage.rl.teacher", tok)[0] if rl.teacher else None
    engine = colocated.start_engine(cfg, policy, run_dir / "hf_init", tok)
    settings = LossSettings.from_config(rl, r.max_new_tokens)
    estimate = ADVANTAGES.get(rl.advantage)
    passes = {id(policy): "old", id(ref): "ref", id(teacher): "teacher"}  # each pass's phase in the step's time
    logprobs_of = lambda model, batch: _logprobs(model, batch, cfg, passes[id(model)])  # noqa: E731
    context = AdvantageContext(policy, teacher, logprobs_of)
    done = policy.step // rl.minibatches
    tools = ToolRunner.from_config(r, tok, cfg.reward.workers)  # None without rollout.max_tool_calls
    with (
        engine or contextlib.nullcontext(),
        training_rewards(cfg, tok) as pool,
        RewardPool(SCORES, cfg.reward.timeout_s, cfg.reward.workers) as eval_pool,
        RolloutProducer(
            rollouts(cfg, tok, train_rows, pool, tools), engine, r, t.steps, done, position, step_dir, colocated.rest
        ) as producer,
        LoopShell(
            cfg,
            policy,
            "GRPO",
            start=done,
            checkpoint_extra=lambda: {
                "rl_step": policy.step // rl.minibatches,
                "prompt_position": producer.position,
                "evals": evals,
            },
            checkpoint_files=producer.files,
            max_bad_steps=rl.max_bad_steps,
            guard_fix="lower stage.train.optim.lr or raise stage.rl.kl_coef.",
            describe=lambda row: (
                f"reward {row['reward/mean']:.3f} acc {row.get('reward/accuracy') or 0:.3f} "
                f"len {row['response_length/mean']:.1f} {row['perf/tokens_per_s']:,.0f} tok/s"
            ),
        ) as shell,
    ):
        evaluate_now = lambda: summarize(  # noqa: E731  (generated in line with the engine's other work)
            producer.call(
                lambda engine: eval_records(engine, tok, eval_rows, cfg.eval, eval_pool, r.max_new_tokens, tools),
                "eval",
            ),
            eval_rows,
            cfg.eval,
        )
        if "base" not in evals:
            evals["base"] = evaluate_now()
        for step in shell.steps():
            batch = producer.batch(step)  # rollout → reward (rlhf.producer: now, or generated ahead)
            with phase("advantage"):
                batch.advantages = estimate(batch, context)
            # The clipping anchor: the teacher estimator fills it already; one minibatch is exactly on-policy,
            # so the update's own forward gives it (grpo.update), one pass fewer.
            if batch.old_logp is None and rl.minibatches > 1:
                batch.old_logp = logprobs_of(policy, batch)
            batch.ref_logp = logprobs_of(ref, batch) if ref is not None else None
            stats = grpo.update(
                policy, batch.tensors(), settings, rl.minibatches, t.micro_batch_size, r.temperature, r.oracle, routes
            )
            if batch.old_logp is None:
                batch.old_logp, batch.trainer_top_logp = stats.pop("old_logp"), stats.pop("trainer_top_logp", None)
                batch.route_agreement = stats.pop("route_agreement", None)
            sync = producer.send_weights(lambda engine: colocated.sync(policy, engine, r.sync_bucket_bytes))
            if refit_probe.enabled(cfg):  # the engine serves what was sent (trainer vs engine on a fixed sequence)
                with phase("sync_load"):
                    sync["receipt"]["probe_gap"] = refit_probe.probe(policy, engine, r.refit_probe_tol, step)
            refresh_reference(cfg, step, policy, ref)
            if rl.eval_every and step % rl.eval_every == 0:
                evals.setdefault("history", []).append({"step": step, **evaluate_now()})
            with phase("tracking"):
                row = step_metrics(step, batch, stats, sync, shell.ledger, r, cfg.model.vocab_size)
            shell.end_step(step, row, stats["update_ok"], stats.get("loss"))
        evals["final"] = evaluate_now()
    if rank0:
        (run_dir / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")
    return evals


def rollouts(cfg: Config, tok, rows: list[dict], rewards, tools: ToolRunner | None = None):
    """What the rollout producer calls for a step's scored rollouts from the prompt stream at `at`."""
    r, rl = cfg.rollout, cfg.stage.rl
    how = lambda step: sampling(r, cfg.seed, step, stop_token_ids(tok), top_logprobs=r.top_logprobs)  # noqa: E731
    alone = r.mode != "sync"  # on the producer's thread, which shares the batch with model-parallel peers
    return lambda engine, step, at: grpo.collect(
        engine, tok, rows, at, how(step), rewards, rl, cfg.stage.train.seq_length, tools, alone
    )


def refresh_reference(cfg: Config, step: int, policy, ref) -> None:
    """Every stage.rl.ref_refresh_every steps the KL reference becomes the current policy (R1-Zero: 400),
    saved so that a resumed run compares with the same one."""
    every = cfg.stage.rl.ref_refresh_every
    if ref is not None and every and step % every == 0:
        with phase("checkpoint"):
            copy_weights(policy, ref)
            ckpt.save(ref, Path(cfg.run_dir) / "reference", keep=1, with_optimizer=False)


def _logprobs(model, batch, cfg: Config, which: str) -> torch.Tensor:
    """One scoring pass over the batch: `which` (old, ref, teacher) names its phase in the step's time. The
    old pass also scores the engine's top tokens for the mismatch oracle (batch.trainer_top_logp) and
    replays or records MoE routing (batch.route_agreement)."""
    old = which == "old"
    routes = route_mode(cfg) if old else None
    with phase(f"logprobs_{which}"):
        scored = grpo.scoring_pass(
            model,
            batch.tensors(),
            cfg.stage.train.micro_batch_size,
            cfg.rollout.temperature,
            old and cfg.rollout.oracle,
            routes,
        )
    if old:
        batch.trainer_top_logp, batch.route_agreement = scored.top_logp, scored.route_agreement
    return scored.logp


def start_from(cfg: Config, policy, run_dir: Path) -> tuple[int, dict, str | None]:
    """Resume from run_dir/checkpoints, else load stage.init_from's weights (a fresh optimizer, step 0).
    Returns the prompt-stream position, the evaluations done so far and the checkpoint resumed from."""
    meta = ckpt.resume(policy, run_dir, cfg.stage.init_from)
    if meta is not None:
        log.info("resumed from %s at RL step %d", run_dir / "checkpoints", meta["extra"]["rl_step"])
        return meta["extra"]["prompt_position"], meta["extra"]["evals"], meta["step_dir"]
    if not cfg.stage.init_from:
        log.warning("stage.init_from is unset: GRPO starts from random weights")
    return 0, {}, None


def reference(cfg: Config, policy, run_dir: Path):
    """The frozen KL reference: the initial weights, or the last refresh when resuming. Without
    stage.init_from the initial weights are the policy's at step 0, saved then under run_dir/reference:
    a resumed run's policy has moved on and is no reference."""
    ref = build_policy(cfg, with_optimizer=False)
    if (run_dir / "reference" / ckpt.LATEST).exists():
        ckpt.load(ref, run_dir / "reference", with_optimizer=False)
    elif cfg.stage.init_from:
        ckpt.load_weights(ref, cfg.stage.init_from)
    elif policy.step == 0:
        copy_weights(policy, ref)
        ckpt.save(ref, run_dir / "reference", keep=1, with_optimizer=False)
    else:
        raise ConfigError(
            f"{run_dir} resumes at policy step {policy.step} without stage.init_from and without the KL "
            f"reference its first start saves ({run_dir / 'reference'}): its weights at step 0 are gone. Fix: "
            "set stage.init_from to the weights the run started from, or stage.rl.kl_coef=0."
        )
    return ref


@torch.no_grad()
def copy_weights(src, dst) -> None:
    for a, b in zip(src.chunks, dst.chunks):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa)
