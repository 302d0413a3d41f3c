"""Where a training step's wall time goes: named phases, timed where the work happens, summed per step.

    with phase("update"):          # anywhere, at any depth; a no-op when no ledger is active
        ...
    for bucket in timed(buckets, "sync_transfer"): ...   # an iterator's own time, per next()

A loop activates one `Ledger` (rlhf.loop.LoopShell) and closes a window per step: the step's row gets
`time/<phase>_s` for every phase, `time/step_s` (the window: from the previous step's row to this one)
and `time/covered_frac` (the phases' sum over the window). There is no catch-all phase: time spent outside
every phase is what covered_frac misses. Phases nest exclusively: time inside an inner phase counts for it
alone, so the parts never add up to more than the wall time.

A window runs from one row to the next, so what a loop does after logging a row (writing it, a checkpoint)
is in the next step's row; the time before the first step (e.g. the base model's evaluation) is in the
first step's.

The ledger accounts for the trainer's thread, the one that built it: phases entered on other threads (an
overlapped rollout producer, rlhf.producer) are theirs to account for, and the trainer's wait for them is
its own phase.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterable, Iterator

# Every phase a step's row reports (0 when a step had none of it), in the stacking order of the report.
PHASES = (
    "generation",  # rollouts in the engine (and handing them to the model-parallel peers)
    "tools",  # tool calls of tool-integrated rollouts (rlhf.tool_calls), inside generation
    "reward",  # reward scoring
    "advantage",  # advantage estimation (the teacher's log-prob pass is timed apart)
    "logprobs_old",
    "logprobs_ref",
    "logprobs_teacher",
    "data",  # supervised loops: the step's micro-batches
    "update",  # forward, backward and optimizer steps
    "sync_export",  # trainer → engine weights: gathering into full HF-named tensors
    "sync_transfer",  # their buckets (contiguous copies handed to the engine)
    "sync_load",  # the engine's side: waking, loading, re-packing, cache reset
    "eval",
    "checkpoint",
    "tracking",  # computing, writing and showing the metrics row
)


class Ledger:
    def __init__(self):
        self.stack: list[str] = []
        self.thread = threading.get_ident()
        self.window_start = self.mark = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _credit(self) -> float:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.mark
        self.mark = now
        return now

    def enter(self, name: str) -> None:
        if name not in self.seconds:
            raise ValueError(f"unknown step phase {name!r}: add it to core.ledger.PHASES")
        self._credit()
        self.stack.append(name)

    def leave(self) -> None:
        self._credit()
        self.stack.pop()

    def elapsed(self) -> float:
        """Wall seconds since the window opened."""
        return time.perf_counter() - self.window_start

    def close_window(self) -> dict:
        """The window's `time/` entries; opens the next window."""
        now = self._credit()
        wall = now - self.window_start
        row = {f"time/{k}_s": v for k, v in self.seconds.items()}
        row["time/step_s"] = wall
        row["time/cpu_s"] = time.process_time() - self.cpu_start
        row["time/covered_frac"] = sum(self.seconds.values()) / wall if wall > 0 else 1.0
        # What the trainer blocked on: all of generation when synchronous, the part an overlapped producer
        # had not finished yet otherwise (rlhf.producer then times its wait as "generation").
        row["time/generation_wait_s"] = self.seconds["generation"]
        self.window_start, self.cpu_start = now, time.process_time()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        return row


_active: Ledger | None = None


@contextlib.contextmanager
def activated(ledger: Ledger) -> Iterator[Ledger]:
    """Makes `ledger` the one phases report to, for the duration."""
    global _active
    previous, _active = _active, ledger
    try:
        yield ledger
    finally:
        _active = previous


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    ledger = _active
    if ledger is None or ledger.thread != threading.get_ident():
        yield
        return
    ledger.enter(name)
    try:
        yield
    finally:
        ledger.leave()


def timed(items: Iterable, name: str) -> Iterator:
    """`items` with the time each next() takes charged to phase `name` (not the consumer's time)."""
    it = iter(items)
    while True:
        with phase(name):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def current() -> Ledger | None:
    return _active
