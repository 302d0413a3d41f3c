"""The shell every training loop runs in, supervised and RL alike: metrics (rlhf.tracking), a progress bar,
the non-finite-loss guard, checkpoints on schedule and at the end, and preemption. A loop's own file then
holds only what one of its steps does:

    with LoopShell(cfg, policy, "GRPO", start=done, checkpoint_extra=lambda: {...}) as shell:
        for step in shell.steps():
            ...                                  # one step's work
            shell.end_step(step, row, ok, loss)  # log, progress, guard, checkpoint, stop if preempted

`step` counts the loop's own steps (optimizer steps for supervised training, RL steps for GRPO, whose steps
hold stage.rl.minibatches optimizer steps each); the checkpoint names the policy's optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from core.config import Config
from core.ledger import Ledger, activated, phase
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from rlhf.guard import NonFiniteGuard
from rlhf.preempt import PreemptionWatch
from rlhf.tracking import Tracker

log = logging.getLogger("r1stack.loop")


class LoopShell(contextlib.ExitStack):
    def __init__(
        self,
        cfg: Config,
        policy,
        label: str,
        start: int,
        checkpoint_extra: Callable[[], dict],
        max_bad_steps: int,
        guard_fix: str,
        describe: Callable[[dict], str],
        checkpoint_files: Callable[[], dict[str, bytes]] | None = None,
    ):
        """`start`: steps already done (0, or where a resumed run stands); `checkpoint_extra()`: what a
        checkpoint records beside the weights for this loop to resume, `checkpoint_files()` the same as
        files (e.g. rollouts generated ahead); `describe(row)`: the step's summary on the progress bar and
        in the plain log."""
        super().__init__()
        t = cfg.stage.train
        self.cfg, self.policy, self.start, self.last = cfg, policy, start, t.steps
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.extra, self.files = checkpoint_extra, checkpoint_files or dict
        self.guard = NonFiniteGuard(max_bad_steps, guard_fix)
        self.rank0 = P.is_rank0()
        self.bar = _Progress(self.rank0, label, self.last, start, describe)

    def __enter__(self) -> LoopShell:
        super().__enter__()
        self.tracker = self.enter_context(Tracker(self.cfg, self.cfg.run_dir, self.rank0))
        self.tracker.trim(self.start)  # a resumed run drops the steps its checkpoint never saw
        self.ledger = self.enter_context(activated(Ledger()))  # the steps' time/ entries (core.ledger)
        self.enter_context(self.bar)
        self.watch = self.enter_context(PreemptionWatch())
        return self

    def steps(self) -> range:
        return range(self.start + 1, self.last + 1)

    def end_step(self, step: int, row: dict, update_ok: bool, loss) -> None:
        """Collective: logs the step's metrics row with its time ledger, then checkpoints on
        stage.train.save_every, at the last step and when preempted (raising Preempted after the save).
        Writing the row and the checkpoint are timed in the next step's row (core.ledger)."""
        row.update(self.ledger.close_window())
        with phase("tracking"):
            self.tracker.log(row)
            self.bar.advance(step, row)
            self.guard.update(update_ok, step, loss)
        preempted = self.watch.requested()
        every = self.cfg.stage.train.save_every
        if preempted or (every and step % every == 0) or step == self.last:
            self.save()
        if preempted:
            raise self.watch.stop(step)

    def save(self) -> None:
        """Collective: a checkpoint of the policy now."""
        with phase("checkpoint"):
            files = self.files()  # first: a producer's files settle what extra() then records
            extra, keep = self.extra(), self.cfg.stage.train.keep_checkpoints
            ckpt.save(self.policy, self.root, extra=extra, keep=keep, files=files)

    def summary(self, values: dict) -> None:
        self.tracker.summary(values)


class _Progress:
    """A rich bar on an interactive rank 0; elsewhere on rank 0 a plain line every tenth of the run."""

    def __init__(self, rank0: bool, label: str, total: int, start: int, describe: Callable[[dict], str]):
        self.rank0, self.total, self.describe = rank0, total, describe
        self.interactive = rank0 and sys.stdout.isatty() and os.environ.get("R1_NO_PROGRESS") != "1"
        self.label, self.start, self.bar = label, start, None

    def __enter__(self) -> _Progress:
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[what]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.start, what="")
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, step: int, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, what=self.describe(row))
        elif self.rank0 and (step % max(1, self.total // 10) == 0 or step == self.total):
            print(f"{self.label} step {step}/{self.total} {self.describe(row)}", flush=True)
