"""The supervised loop that pretrain, sft, cold_start_sft, distill, reward_model and the judge run: packed rows,
one optimizer step per global batch, resume from RUN_DIR/checkpoints, then the stage's held-out check.

A stage is a ``Supervised``: how it packs its rows, its loss, its output head and its final check. The batch
of each step is a pure function of (data.seed, step), so re-running the same command after a kill finishes
the same job.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.config import Config
from core.data import micro_batches, shuffled_rows
from core.ledger import phase
from core.run_tokenizer import run_tokenizer
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from parallel.policy import build_policy
from parallel.step import train_step
from rlhf.loop import LoopShell
from rlhf.tasks import TASKS

log = logging.getLogger("r1stack.trainer")

MAX_BAD_STEPS = 5  # non-finite losses in a row before giving up


@dataclass(frozen=True)
class Supervised:
    """What a supervised stage gives the loop."""

    packed: Callable  # (cfg, tok) -> packed rows (core.data.pack's dict; extra keys ride along)
    forward: Callable | None = None  # megatron forward step with the loss; None: next-token cross-entropy
    head: str = "lm"  # lm | scalar (a reward model)
    # (cfg, policy, tok) -> summary entries, collective; None: data.task's held-out check, if it has one
    final_eval: Callable | None = None


def batch_rows(step: int, seed: int, num_rows: int, global_batch: int) -> list[int]:
    """Row indices of the global batch at 0-based `step`; a resumed run sees the same batches."""
    return shuffled_rows(step * global_batch, global_batch, seed, num_rows)


def run(cfg: Config, job: Supervised) -> dict:
    t_start = time.time()
    env = P.init_distributed(cfg)
    try:
        return _train(cfg, job, env.rank == 0, t_start)
    finally:
        P.shutdown()


def _train(cfg: Config, job: Supervised, rank0: bool, t_start: float) -> dict:
    t, run_dir = cfg.stage.train, Path(cfg.run_dir)
    tok = run_tokenizer(cfg, run_dir=run_dir, write=rank0)
    data = job.packed(cfg, tok)
    num_rows = data["tokens"].shape[0]
    policy = build_policy(cfg, head=job.head)
    meta = ckpt.resume(policy, run_dir, cfg.stage.init_from)
    if meta is not None:
        log.info("resumed from %s at step %d", run_dir / "checkpoints", policy.step)
        if meta["extra"].get("data_position") != policy.step * t.global_batch_size:
            log.warning(
                "checkpoint data_position %s does not match step×global batch: the batch size changed",
                meta["extra"].get("data_position"),
            )
    if rank0:
        log.info(
            "%s: %d packed rows of %d tokens; steps %d → %d",
            cfg.stage.name,
            num_rows,
            t.seq_length,
            policy.step,
            t.steps,
        )

    recent, last = [], {"loss": float("nan")}
    with LoopShell(
        cfg,
        policy,
        cfg.stage.name,
        start=policy.step,
        checkpoint_extra=lambda: _checkpoint_extra(cfg, policy),
        max_bad_steps=MAX_BAD_STEPS,
        guard_fix="lower stage.train.optim.lr, raise warmup_steps, or use dtype=fp32.",
        describe=lambda row: (
            f"loss {row['train/loss']:.4f} lr {row['train/lr']:.2e} {row['perf/tokens_per_s']:,.0f} tok/s"
        ),
    ) as shell:
        for step in shell.steps():
            t0 = time.perf_counter()
            with phase("data"):
                rows = batch_rows(step - 1, cfg.data.seed, num_rows, t.global_batch_size)
                mbs = micro_batches(data, P.split_for_data_parallel(rows), t.micro_batch_size)
                tokens = int((data["segment_ids"][rows] >= 0).sum())
            with phase("update"):
                last = train_step(policy, mbs, job.forward)
            dt = time.perf_counter() - t0
            row = {
                "step": policy.step,
                "train/loss": last["loss"],
                "train/grad_norm": last["grad_norm"],
                "train/lr": last["lr"],
                "train/skipped": not last["update_ok"],
                "perf/step_s": dt,
                "perf/tokens_per_s": tokens / dt,
                "data/position": policy.step * t.global_batch_size,
            }
            if last["update_ok"]:
                recent = (recent + [last["loss"]])[-50:]
            shell.end_step(step, row, last["update_ok"], last["loss"])

        summary = {
            "steps": policy.step,
            "final_loss": last["loss"],
            "train_s": time.time() - t_start,
            "final_loss_mean50": sum(recent) / len(recent) if recent else None,
        }
        summary.update(_final_eval(cfg, job, policy, tok, rank0))
        summary["wall_s"] = time.time() - t_start
        if rank0:
            summary = {k: _finite(v) for k, v in summary.items()}
            tmp = run_dir / "train_summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
            tmp.replace(run_dir / "train_summary.json")
            shell.summary(summary)
            print(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval/examples")}), flush=True)
    P.barrier()  # other ranks wait for rank 0's eval before the groups go away
    return summary


def _final_eval(cfg: Config, job: Supervised, policy, tok, rank0: bool) -> dict:
    task = TASKS.find(cfg.data.task)
    check = job.final_eval or (task.final_eval if task is not None else None)
    if check is None:
        out = {"eval/note": f"skipped: no held-out check for data.task={cfg.data.task}"}
    else:
        out = check(cfg, policy, tok)
    if "eval/note" in out and rank0:
        log.warning("held-out eval %s", out["eval/note"])
    return out


def _checkpoint_extra(cfg: Config, policy) -> dict:
    extra = {"data_position": policy.step * cfg.stage.train.global_batch_size}
    if policy.head == "scalar":  # a reward model: what it reads of a response, so its users show it the same
        extra["view"] = {"part": cfg.stage.view, "reasoning_end": cfg.stage.cold_start.reasoning_end}
    return extra


def _finite(v):
    # json.dumps writes NaN/Infinity, which strict JSON readers (jq, browsers) reject.
    return None if isinstance(v, float) and not math.isfinite(v) else v
