"""Where a GRPO step's rollouts come from (rollout.mode): generated when the step asks for them (sync), or
ahead of the trainer by an engine in a process of its own (one_step_off, async), which a thread here drives.

    batch = producer.batch(step)        # the step's scored RolloutBatch; overlapped: the wait for it
    sync = producer.send_weights(send)  # after the update: `send(engine)` puts the new weights in line
    result = producer.call(fn)          # other engine work (evaluation), in line with the rest

The schedule is a function of the step, never of timing. Engine work runs one job at a time in the order it
was asked for; when step k begins, the batches of steps up to k + lead are asked for, after the weights of
every step before k. Step j's batch therefore comes from weight version max(0, j - 1 - lead) (version v: the
weights after v steps), `lead` = 0 (sync), 1 (one_step_off) or rollout.max_staleness (async), so a run
repeats exactly, and a checkpoint that holds the batches generated ahead (`files`/`restore`) resumes it
exactly: those batches' weights are gone, the engine restarts on the checkpoint's, which are the ones the
next batch asks for.

With partial rollouts (rollout.partial, rlhf.partial) a step's generation stops at its scheduled interrupt
and goes on after the next weights: step j's starts on version max(0, j - 1 - lead) and finishes on the one
after. A checkpoint then also holds the interrupted step's prefix, and the resumed run continues it.

Several trainer processes: each model replica's engine rank (inference.colocated.hosts_engine) runs a
producer thread for its engine and its share of the prompts; `collect` runs there alone, with no collective,
and `batch` hands the batch to the replica's tensor/pipeline-parallel peers, which generate nothing. Each
replica's buffer is a file of its own in the checkpoint.
"""

from __future__ import annotations

import pickle
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from core.errors import ConfigError
from core.ledger import phase
from inference.supervision import deadline
from parallel import parallelize as P
from rlhf.partial import PartialBatch
from rlhf.rollout import RolloutBatch

BUFFER_FILE = "rollout_buffer.dp{}.pkl"  # a replica's batches generated ahead, in a checkpoint's files/


class RolloutProducer:
    def __init__(
        self,
        collect: Callable[[object, int, int], tuple[RolloutBatch, int]],
        engine,
        rollout,
        last_step: int,
        done_steps: int = 0,
        position: int = 0,
        step_dir: str | None = None,
        rest: Callable[[object], None] = lambda engine: None,
    ):
        """`collect(engine, step, position)`: the step's scored batch from the prompt stream at `position`, and
        the stream's next position; `rollout`: the rollout config (mode, lead). Where the run stands: `done_steps`
        trained, the stream at `position`, and (resuming) the checkpoint `step_dir` with the batches generated
        ahead. `rest(engine)`: what sync mode does once a step's rollouts are in (the colocated sleep). `engine`
        is None on the ranks that host none: overlapped, they take their replica's batches from its engine rank."""
        self.collect, self.engine, self.lead, self.last, self.rest = collect, engine, rollout.lead, last_step, rest
        self.overlapped = rollout.mode != "sync"
        self.thread = _JobThread() if self.overlapped and engine is not None else None
        self.position = position  # the prompt stream's next position, after every batch asked for
        self.version = done_steps  # weight versions sent: the trainer's steps so far
        self.engine_version = done_steps  # the version the engine serves, set in line with its jobs
        self.asked = done_steps  # the last step whose batch was asked for
        self.pending: dict[int, Future] = {}  # batches asked for, whole
        self.partial_tokens = rollout.interrupt_at if rollout.partial and self.overlapped else 0
        self.in_flight: dict[int, Future] = {}  # partial: batches started, not yet asked to finish (PartialBatch)
        self.busy_s = 0.0  # engine-side seconds (generation, scoring, weight loads) since the last batch()
        buffer = _read_buffer(step_dir) if self.thread is not None else {}
        if buffer:
            self.pending = {step: _done(batch) for step, batch in buffer["batches"].items()}
            self.asked, self.position = buffer["asked"], buffer["position"]
            for step, prefix in buffer.get("in_flight", {}).items():  # its prefix again, then on as before
                self.in_flight[step] = self._run(self._begin, step, prefix)

    def __enter__(self) -> RolloutProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the trainer's side ------------------------------------------------------------------------------

    def batch(self, step: int) -> RolloutBatch:
        for j in range(self.asked + 1, min(step + self.lead, self.last) + 1):
            self._finish_in_flight()  # partial: the step before goes on, on the weights sent since it began
            if self.partial_tokens:
                self.in_flight[j] = self._run(self._begin, j)
            else:
                self.pending[j] = self._run(self._generate, j)
            self.asked = j
        if step not in self.pending:  # the last step's batch: no later one asks it to finish
            self._finish_in_flight()
        with phase("generation"):  # sync: the generation itself; overlapped: the trainer waiting for it
            batch = self._wait(self.pending.pop(step), f"step {step}'s rollouts")
            if self.overlapped:  # collect ran alone on the engine rank's thread: its model-parallel peers' copy
                batch = P.share_model_parallel(batch)
        if not self.overlapped:
            self.rest(self.engine)
        batch.info["staleness"] = [self.version - s.version for s in batch.samples]
        tokens = [v for s in batch.samples for v in s.token_versions]
        batch.info["continued"] = sum(len(set(s.token_versions)) > 1 for s in batch.samples)
        batch.info["token_staleness_mean"] = self.version - sum(tokens) / len(tokens) if tokens else None
        batch.info["lead"] = self.lead
        batch.info["engine_busy_s"], self.busy_s = self.busy_s, 0.0
        return batch

    def send_weights(self, send: Callable[[object], dict]) -> dict:
        """After a step's update: `send(engine)` (inference.colocated.sync) to the engine, or, overlapped, to a
        stand-in that keeps a copy of the weights for the engine's turn."""
        self.version += 1
        if not self.overlapped:
            stats = send(self.engine)
            self.engine_version = self.version
            stats["receipt"] = {**stats.get("receipt", {}), "version": self.version}
            return stats
        copy = _WeightsCopy() if self.thread is not None else None  # None: a rank without an engine
        stats = send(copy)
        if copy is not None:
            self._run(self._load, copy.weights, self.version)
        # The engine loads these later, in line with its jobs; a refused load fails the job thread, and the
        # trainer's next wait raises it. The row carries the version sent: which load has finished by now is a
        # matter of timing, and rows must repeat exactly.
        return {**stats, "receipt": {"version": self.version}}

    def call(self, fn: Callable[[object], object], what: str):
        """`fn(engine)` once the engine work asked for so far is done (its weights: the last sent); the
        trainer's wait for it is the step phase `what`. Overlapped, a rank without an engine gets `fn(None)`."""
        with phase(what):
            if self.overlapped and self.thread is None:
                return fn(None)
            return self._wait(self._run(fn, self.engine), what)

    def files(self) -> dict[str, bytes]:
        """For a checkpoint (this rank's files): the replica's batches generated ahead, waited for, with the
        stream's position after them."""
        if self.thread is None:  # nothing is generated ahead here
            return {}
        batches = {step: self._wait(f, f"step {step}'s rollouts") for step, f in sorted(self.pending.items())}
        # The interrupted step: its prefix (the weights that sampled it are gone) and the stream position it
        # drew from, which is the one after the whole batches.
        in_flight = {step: self._wait(f, f"step {step}'s rollouts").prefix for step, f in self.in_flight.items()}
        buffer = {"asked": self.asked, "position": self.position, "batches": batches, "in_flight": in_flight}
        return {BUFFER_FILE.format(P.data_parallel_rank()): pickle.dumps(buffer)}

    def close(self) -> None:
        if self.thread is not None:
            self.thread.close()

    # -- the engine's side (the producer thread when overlapped) --------------------------------------------
    def _run(self, fn, *args) -> Future:
        if self.thread is not None:
            return self.thread.submit(self._timed, fn, *args)
        if self.overlapped:  # a rank without an engine: its replica's engine rank does the work
            return _done(None)
        return _done(self._timed(fn, *args))

    def _wait(self, job: Future, what: str):
        """The job's result. Overlapped, the engine's own calls run unsupervised on the producer thread, so
        the wait is supervised here: a dead engine process or a wait past (lead + 2) × rollout.timeout_s
        becomes the engine's clear error instead of a hang."""
        if self.thread is None or job.done():
            return job.result()
        limit = self.engine.timeout_s * (self.lead + 2)
        with deadline(limit, f"waiting for {what}", dead_reason=self.engine.dead_reason):
            return job.result()

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _generate(self, step: int) -> RolloutBatch:
        batch, self.position = self.collect(self.engine, step, self.position)
        for s in batch.samples:
            s.version = self.engine_version
        return batch

    def _finish_in_flight(self) -> None:
        for step, started in self.in_flight.items():
            self.pending[step] = self._run(self._end, started)
        self.in_flight = {}

    def _begin(self, step: int, replay=None) -> PartialBatch:
        part = PartialBatch(
            self.collect, self.engine, step, self.position, self.partial_tokens, lambda: self.engine_version, replay
        )
        part.start()
        return part

    def _end(self, started: Future) -> RolloutBatch:
        batch, self.position = started.result().finish()  # started: done, it ran earlier on this thread
        for s in batch.samples:
            s.version = min(s.token_versions, default=self.engine_version)
        return batch

    def _load(self, weights: list, version: int) -> None:
        self.engine.update_weights(weights)  # a refused load (inference.refit) fails this job and later ones
        self.engine_version = version


class _JobThread:
    """Runs submitted jobs one at a time, in order, on a daemon thread (a job stuck in a dead engine must not
    hold up the exit). After a job fails, every later one fails with the same error: a generation must
    never run on weights that did not arrive."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.failed: BaseException | None = None
        threading.Thread(target=self._loop, name="rollout-producer", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        job = Future()
        self.jobs.put((job, fn, args))
        return job

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, fn, args = item
            if self.failed is not None:
                job.set_exception(self.failed)
                continue
            try:
                job.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  (handed to the waiting trainer)
                self.failed = e
                job.set_exception(e)


class _WeightsCopy:
    """Takes what inference.colocated.sync hands an engine, copied (the trainer goes on updating its own)."""

    def __init__(self):
        self.weights: list = []

    def update_weights(self, named_tensors) -> None:
        self.weights = [(name, t.detach().clone()) for name, t in named_tensors]

    def wake_up(self, tags=None) -> None:
        pass


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


def _read_buffer(step_dir: str | None) -> dict:
    """This replica's buffer in the checkpoint resumed from (none in a fresh run or a sync checkpoint)."""
    if step_dir is None:
        return {}
    files, dp = Path(step_dir) / "files", P.data_parallel_size()
    path, written = files / BUFFER_FILE.format(P.data_parallel_rank()), sorted(files.glob("rollout_buffer*.pkl"))
    if written and (len(written) != dp or path not in written):
        raise ConfigError(
            f"{step_dir} holds the rollouts generated ahead as {[f.name for f in written]}, and this run with "
            f"{dp} model replicas (parallel.data) resumes {path.name}: each replica resumes its own. Fix: resume "
            "with the parallel layout the run was saved with."
        )
    return pickle.loads(path.read_bytes()) if written else {}
