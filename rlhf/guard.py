"""Stops a run that keeps producing non-finite losses; a single bad step is skipped and logged."""

from __future__ import annotations

import logging

log = logging.getLogger("r1stack.guard")


class NonFiniteGuard:
    """`update(ok, step, loss)` after every optimizer step (ok: the update ran). Raises after `limit`
    skipped steps in a row, with `fix` in the message."""

    def __init__(self, limit: int, fix: str):
        self.limit, self.fix, self.in_a_row = limit, fix, 0

    def update(self, ok: bool, step: int, loss) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step, loss, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} non-finite losses in a row (last at step {step}). Fix: {self.fix}")
