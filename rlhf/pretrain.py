"""The `pretrain` stage: next-token training of the base model on packed text, then a held-out check.

A run is resumable: checkpoints land in RUN_DIR/checkpoints, and the batch of each step is a pure
function of (data.seed, step), so re-running the same command after a kill finishes the same job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.config import Config, ConfigError
from core.data import causal_mask_from_segments, load_rows, pack, shuffled_rows
from core.tokenizer import build_char_tokenizer, save_tokenizer
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from rlhf.guard import NonFiniteGuard
from rlhf.preempt import PreemptionWatch
from rlhf.tasks import TASKS
from rlhf.tracking import Tracker

log = logging.getLogger("r1stack.pretrain")

MAX_BAD_STEPS = 5  # non-finite losses in a row before giving up


# ---------------------------------------------------------------- data


def load_texts(cfg: Config) -> list[str]:
    d = cfg.data
    if d.source == "generated":
        texts = TASKS.get(d.task).need("pretraining_text", "data.task", "stage=pretrain")(d.num_train, d.seed)
        if d.general_task:  # general text in the corpus too, as a base model sees the web's: of uneven quality
            if not 0 < d.general_share < 1:
                raise ConfigError(f"data.general_share={d.general_share}: expected a share in (0, 1).")
            rows = TASKS.get(d.general_task, "data.general_task").need(
                "sft_rows", "data.general_task", "general pretraining text"
            )
            n = round(len(texts) * d.general_share / (1 - d.general_share))
            texts += [r["prompt"] + r["response"] for r in rows(n, d.seed, cfg)]
            random.Random(d.seed).shuffle(texts)
        return texts
    if d.source in ("jsonl", "parquet"):
        if not d.train_path:
            raise ConfigError(f"data.source={d.source} needs data.train_path (a file with a 'text' field per row).")
        return [row["text"] for row in load_rows(d.train_path, "text")]
    raise ConfigError(f"data.source={d.source!r}: expected generated, jsonl or parquet.")


def pack_texts(texts: list[str], tok, seq_len: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """bos + text + eos per sample, packed into rows of seq_len. Packing runs per chunk of samples
    because first-fit over the whole corpus is quadratic."""
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    samples = [{"input_ids": x + [tok.eos_token_id]} for x in ids]
    parts = [pack(samples[i : i + chunk], seq_len, tok.pad_token_id) for i in range(0, len(samples), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def batch_rows(step: int, seed: int, num_rows: int, global_batch: int) -> list[int]:
    """Row indices of the global batch at 0-based `step`; a resumed run sees the same batches."""
    return shuffled_rows(step * global_batch, global_batch, seed, num_rows)


def micro_batches(data: dict[str, torch.Tensor], rows: list[int], micro: int) -> list[dict]:
    """Model inputs per micro-batch; keys beyond the packed ones (a reward model's "ends") come along."""
    out = []
    for i in range(0, len(rows), micro):
        idx = torch.tensor(rows[i : i + micro])
        mb = {k: v[idx] for k, v in data.items() if k != "segment_ids"}
        mb["labels"] = mb["labels"].clamp(min=0)  # ignored positions have loss_mask 0
        mb["attention_mask"] = causal_mask_from_segments(data["segment_ids"][idx])
        out.append(mb)
    return out


# ---------------------------------------------------------------- the stage


def _progress(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    task = bar.add_task("pretrain", total=total, completed=start, loss="-", tps="-")
    return bar, task


def packed_texts(cfg: Config, tok) -> dict[str, torch.Tensor]:
    return pack_texts(load_texts(cfg), tok, cfg.stage.train.seq_length)


def final_eval_for(cfg: Config):
    """The held-out check that ends a language model's run on data.task: (cfg, policy, tok) -> summary
    entries, called on every rank. None where the task has none."""
    task = TASKS.find(cfg.data.task)
    return task.final_eval if task is not None else None


def run(cfg: Config, packed_data=packed_texts, forward=None, head: str = "lm", final_eval=None) -> dict:
    """`packed_data(cfg, tok)` gives the packed rows (pretrain: plain text; rlhf.sft: prompt/response);
    `forward` the loss (default: next-token); `head` the output layer; `final_eval(cfg, policy, tok)` the
    held-out check (default: data.task's, `final_eval_for`)."""
    t_start = time.time()
    env = P.init_distributed(cfg)
    try:
        with Tracker(cfg, cfg.run_dir, enabled=env.rank == 0) as tracker:
            return _run(cfg, env.rank == 0, t_start, tracker, packed_data, forward, head, final_eval)
    finally:
        P.shutdown()


def _run(cfg: Config, rank0: bool, t_start: float, tracker: Tracker, packed_data, forward, head, final_eval) -> dict:
    t = cfg.stage.train
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"

    tok = build_char_tokenizer()
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"the char tokenizer has {len(tok)} tokens > model.vocab_size={cfg.model.vocab_size}. "
            f"Fix: set model.vocab_size >= {len(tok)}."
        )
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, run_dir / "tokenizer")

    data = packed_data(cfg, tok)
    num_rows = data["tokens"].shape[0]
    policy = P.build_policy(cfg, head=head)
    if (ckpt_root / ckpt.LATEST).exists():
        meta = ckpt.load(policy, ckpt_root, with_optimizer=True, with_rng=True)
        log.info("resumed from %s at step %d", ckpt_root, policy.step)
        if meta["extra"].get("data_position") != policy.step * t.global_batch_size:
            log.warning(
                "checkpoint data_position %s does not match step×global batch: the batch size changed",
                meta["extra"].get("data_position"),
            )
    elif cfg.stage.init_from:  # fine-tuning (or continued pretraining): its weights, a fresh optimizer
        ckpt.load(policy, ckpt.of_run(cfg.stage.init_from), with_optimizer=False)
        policy.step = 0
    start = policy.step
    if rank0:
        tracker.trim(start)
        log.info("pretrain: %d packed rows of %d tokens; steps %d → %d", num_rows, t.seq_length, start, t.steps)

    show = rank0 and sys.stdout.isatty() and os.environ.get("R1_NO_PROGRESS") != "1"
    bar, task = _progress(show, t.steps, start)
    last, recent = {"loss": float("nan")}, []
    saved_at = start
    guard = NonFiniteGuard(MAX_BAD_STEPS, "lower stage.train.optim.lr, raise warmup_steps, or use dtype=fp32.")
    with bar, PreemptionWatch() as watch:
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            rows = batch_rows(step, cfg.data.seed, num_rows, t.global_batch_size)
            mbs = micro_batches(data, P.split_for_data_parallel(rows), t.micro_batch_size)
            last = P.train_step(policy, mbs, forward)
            lr = last["lr"]
            dt = time.perf_counter() - t0
            tokens = int((data["segment_ids"][rows] >= 0).sum())
            row = {
                "step": policy.step,
                "train/loss": last["loss"],
                "train/grad_norm": last["grad_norm"],
                "train/lr": lr,
                "train/skipped": not last["update_ok"],
                "perf/step_s": dt,
                "perf/tokens_per_s": tokens / dt,
                "data/position": policy.step * t.global_batch_size,
            }
            tracker.log(row)
            bar.update(task, completed=policy.step, loss=f"{last['loss']:.3f}", tps=f"{tokens / dt:,.0f}")
            if rank0 and not show and (policy.step % max(1, t.steps // 10) == 0 or policy.step == t.steps):
                print(
                    f"step {policy.step}/{t.steps} loss {last['loss']:.4f} lr {lr:.2e} {tokens / dt:,.0f} tok/s",
                    flush=True,
                )
            guard.update(last["update_ok"], policy.step, last["loss"])
            if last["update_ok"]:
                recent = (recent + [last["loss"]])[-50:]
            preempted = watch.requested()
            if preempted or (t.save_every and policy.step % t.save_every == 0):
                _save(policy, ckpt_root, cfg)
                saved_at = policy.step
            if preempted:
                raise watch.stop(policy.step)
    if saved_at != policy.step:
        _save(policy, ckpt_root, cfg)
    train_s = time.time() - t_start

    summary = {
        "steps": policy.step,
        "final_loss": last["loss"],
        "train_s": train_s,
        "final_loss_mean50": sum(recent) / len(recent) if recent else None,
    }
    final_eval = final_eval or final_eval_for(cfg)
    if final_eval is None:
        summary["eval/note"] = f"skipped: no held-out check for data.task={cfg.data.task}"
    else:
        summary.update(final_eval(cfg, policy, tok))
    if "eval/note" in summary and rank0:
        log.warning("held-out eval %s", summary["eval/note"])
    summary["wall_s"] = time.time() - t_start
    if rank0:
        summary = {k: _finite(v) for k, v in summary.items()}
        tmp = run_dir / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(run_dir / "train_summary.json")
        tracker.summary(summary)
        print(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval/examples")}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # other ranks wait for rank 0's eval before the groups go away
    return summary


def _finite(v):
    # json.dumps writes NaN/Infinity, which strict JSON readers (jq, browsers) reject.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _save(policy: P.Policy, root: Path, cfg: Config) -> None:
    t = cfg.stage.train
    extra = {"data_position": policy.step * t.global_batch_size}
    if policy.head == "scalar":  # a reward model: what it reads of a response, so its users show it the same
        extra["view"] = {"part": cfg.stage.view, "reasoning_end": cfg.stage.cold_start.reasoning_end}
    ckpt.save(policy, root, extra=extra, keep=t.keep_checkpoints)
