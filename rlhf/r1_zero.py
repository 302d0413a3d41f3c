"""The `r1_zero` stage: GRPO on a base model with rule rewards, rollouts from the colocated engine. The same
loop runs reasoning_rl (R1 stage 2), general_rl (stage 4, with reward models: rlhf/general_rl.py) and
on_policy_distill (per-token advantages from a teacher: grpo.distill_advantages).

    python -m rlhf.train stage=r1_zero stage.init_from=runs/demo/pretrain run_dir=runs/demo/r1_zero

Each step: sample G completions for each prompt → rule rewards → group advantages → trainer
log-probs (old, reference) → rl.minibatches clipped-ratio updates → weights to the engine.
A killed run resumes from run_dir/checkpoints with the same prompt stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.config import Config
from core.data import shuffled_rows
from core.tokenizer import build_char_tokenizer
from inference.engine import Sampling, build_engine
from parallel import checkpoint as ckpt
from parallel import hf_bridge
from parallel import parallelize as P
from parallel.weight_sync import sync_weights
from rlhf import grpo
from rlhf.evaluate import SCORES, evaluate
from rlhf.general_rl import training_rewards
from rlhf.guard import NonFiniteGuard
from rlhf.judge import refuse_judged
from rlhf.losses import LossSettings
from rlhf.preempt import PreemptionWatch
from rlhf.prompts import load_prompts
from rlhf.rewards import RewardPool
from rlhf.rollout import to_batch
from rlhf.step_metrics import StepClock, progress, step_metrics
from rlhf.tracking import Tracker

log = logging.getLogger("r1stack.r1_zero")


def run(cfg: Config) -> dict:
    env = P.init_distributed(cfg)
    try:
        return train(cfg, env.rank == 0)
    finally:
        P.shutdown()


def train(cfg: Config, rank0: bool) -> dict:
    rl, t, run_dir = cfg.stage.rl, cfg.stage.train, Path(cfg.run_dir)
    tok = build_char_tokenizer()
    train_rows, eval_rows = load_prompts(cfg.data, "train"), load_prompts(cfg.data, "eval")
    refuse_judged(train_rows + eval_rows, f"stage={cfg.stage.name}")
    policy = P.build_policy(cfg)
    position, evals = start_from(cfg, policy, run_dir)
    ref = reference(cfg, policy, run_dir) if rl.kl != "none" and rl.kl_coef > 0 else None  # β=0: no KL term
    teacher = ckpt.load_frozen(cfg, rl.teacher, "lm", "stage.rl.teacher")[0] if rl.teacher else None
    engine = start_engine(cfg, policy, run_dir / "hf_init", tok) if hosts_engine() else None
    settings = LossSettings.from_config(rl, cfg.rollout.max_new_tokens)
    r = cfg.rollout
    with (
        engine or contextlib.nullcontext(),
        training_rewards(cfg, tok) as pool,
        RewardPool(SCORES, cfg.reward.timeout_s, cfg.reward.workers) as eval_pool,
        Tracker(cfg, run_dir, rank0) as tracker,
        progress(rank0, t.steps, policy.step // rl.minibatches) as bar,
        PreemptionWatch() as watch,
    ):
        tracker.trim(policy.step // rl.minibatches)
        if "base" not in evals:
            evals["base"] = evaluate(engine, tok, eval_rows, cfg.eval, eval_pool, r.max_new_tokens)
        guard = NonFiniteGuard(rl.max_bad_steps, "lower stage.train.optim.lr or raise stage.rl.kl_coef.")
        for step in range(policy.step // rl.minibatches + 1, t.steps + 1):
            clock = StepClock()
            sampling = Sampling(
                n=r.n,
                temperature=r.temperature,
                top_p=r.top_p,
                max_new_tokens=r.max_new_tokens,
                seed=cfg.seed * 1_000_003 + step,
                stop_token_ids=(tok.eos_token_id,),
            )
            groups, position, info = collect(engine, tok, train_rows, position, sampling, pool, rl)
            clock.lap("rollout")
            samples = [s for g in groups for s in g]
            batch = to_batch(samples, t.seq_length, tok.pad_token_id)
            batch["advantages"] = torch.tensor([s.advantage for s in samples])[:, None].expand_as(batch["loss_mask"])
            batch["old_logp"], _ = grpo.logprobs(policy, batch, t.micro_batch_size, r.temperature)
            if ref is not None:
                batch["ref_logp"], _ = grpo.logprobs(ref, batch, t.micro_batch_size, r.temperature)
            if teacher is not None:  # on-policy distillation: the teacher's per-token judgement replaces rewards
                batch["advantages"] = grpo.distill_advantages(teacher, batch, t.micro_batch_size, r.temperature)
            stats = grpo.update(policy, batch, settings, rl.minibatches, t.micro_batch_size, r.temperature)
            clock.lap("train")
            sync = sync_weights(policy, engine, r.sync_bucket_bytes)
            if ref is not None and rl.ref_refresh_every and step % rl.ref_refresh_every == 0:
                copy_weights(policy, ref)
                ckpt.save(ref, run_dir / "reference", keep=1, with_optimizer=False)
            clock.lap("sync")
            guard.update(stats["update_ok"], step, stats.get("loss"))
            if rl.eval_every and step % rl.eval_every == 0:
                result = evaluate(engine, tok, eval_rows, cfg.eval, eval_pool, r.max_new_tokens)
                evals.setdefault("history", []).append({"step": step, **result})
            row = step_metrics(step, groups, batch, stats, info, sync, clock)
            tracker.log(row)
            bar.advance(row)
            preempted = watch.requested()
            if preempted or (t.save_every and step % t.save_every == 0) or step == t.steps:
                ckpt.save(
                    policy,
                    run_dir / "checkpoints",
                    keep=t.keep_checkpoints,
                    extra={"rl_step": step, "prompt_position": position, "evals": evals},
                )
            if preempted:
                raise watch.stop(step)
        evals["final"] = evaluate(engine, tok, eval_rows, cfg.eval, eval_pool, r.max_new_tokens)
    if rank0:
        (run_dir / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")
    return evals


def collect(engine, tok, rows, position, sampling, pool, rl):
    """Rollouts with rewards and advantages for prompts_per_step groups (this DP rank's share). With
    dynamic sampling, groups of equal rewards are dropped and more prompts drawn, up to
    max_refill_rounds; a short batch is topped up with dropped groups (zero advantage) to keep shapes."""
    keep, dropped, info = [], [], {"prompts": 0, "truncated": 0, "reward_errors": 0, "reward_timeouts": 0}
    want = rl.prompts_per_step // P.data_parallel_size()
    for _ in range(1 + (rl.max_refill_rounds if rl.dynamic_sampling else 0)):
        ids = shuffled_rows(position, rl.prompts_per_step, 0, len(rows))
        position += rl.prompts_per_step
        groups, truncated = grpo.generate_and_share(
            engine, tok, [rows[i] for i in P.split_for_data_parallel(ids)], sampling
        )
        counts = grpo.score(groups, pool, rl, sampling.max_new_tokens)
        info["prompts"] += len(groups)
        info["truncated"] += truncated
        info["reward_errors"] += counts["errors"]
        info["reward_timeouts"] += counts["timeouts"]
        good = {id(g) for g in (grpo.informative(groups) if rl.dynamic_sampling else groups)}
        keep += [g for g in groups if id(g) in good]
        dropped += [g for g in groups if id(g) not in good]
        if P.all_ranks_true(len(keep) >= want):
            break
    groups = (keep + dropped)[:want]
    grpo.set_advantages(groups, rl.advantage)
    info["informative_frac"] = len(grpo.informative(groups)) / max(len(groups), 1)
    return groups, position, info


def hosts_engine() -> bool:
    """One engine per model replica, on its first tensor- and pipeline-parallel rank."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def start_engine(cfg: Config, policy, hf_dir: Path, tok):
    """The engine starts from an HF export of the policy's current weights."""
    hf_bridge.save_hf(policy, hf_dir, tokenizer=tok)  # collective; rank 0 writes a loadable HF dir
    r = cfg.rollout
    engine = build_engine(
        r.engine,
        model_dir=str(hf_dir),
        max_model_len=cfg.stage.train.seq_length,
        kv_cache_bytes=r.kv_cache_bytes,
        seed=cfg.seed,
        overlong_prompt=r.overlong_prompt,
        timeout_s=r.timeout_s,
    )
    if cfg.parallel.unsharded:  # export is then local to this rank
        engine.weights_source = lambda: hf_bridge.export_hf(policy)  # lets a dead engine restart mid-run
    return engine


def start_from(cfg: Config, policy, run_dir: Path) -> tuple[int, dict]:
    """Resume from run_dir/checkpoints, else load stage.init_from's weights (a fresh optimizer, step 0).
    Returns the prompt-stream position and the evaluations done so far."""
    root = run_dir / "checkpoints"
    if (root / ckpt.LATEST).exists():
        meta = ckpt.load(policy, root, with_optimizer=True, with_rng=True)
        log.info("resumed from %s at RL step %d", root, meta["extra"]["rl_step"])
        return meta["extra"]["prompt_position"], meta["extra"]["evals"]
    if cfg.stage.init_from:
        ckpt.load(policy, ckpt.of_run(cfg.stage.init_from), with_optimizer=False)
        policy.step = 0
    else:
        log.warning("stage.init_from is unset: GRPO starts from random weights")
    return 0, {}


def reference(cfg: Config, policy, run_dir: Path):
    """The frozen KL reference: the initial weights, or the last refresh when resuming."""
    ref = P.build_policy(cfg, with_optimizer=False)
    if (run_dir / "reference" / ckpt.LATEST).exists():
        ckpt.load(ref, run_dir / "reference", with_optimizer=False)
    elif cfg.stage.init_from:
        ckpt.load(ref, ckpt.of_run(cfg.stage.init_from), with_optimizer=False)
    else:
        copy_weights(policy, ref)
    return ref


@torch.no_grad()
def copy_weights(src, dst) -> None:
    for a, b in zip(src.chunks, dst.chunks):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa)
