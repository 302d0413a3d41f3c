"""Preemption: SIGUSR1 (Slurm's `--signal=B:USR1@lead`, forwarded to the tasks by slurm/*.sh) or SIGTERM
asks a run to stop at the end of the current step. Every rank learns it at the same step, the stage
writes a checkpoint and raises Preempted, and rlhf.train exits with REQUEUE_EXIT, which the sbatch
scripts answer with `scontrol requeue`; the requeued job resumes from `latest` and nothing is lost.
srun may kill the other tasks as soon as one exits non-zero, so its exit status is not a reliable
signal: the scripts set R1_PREEMPTED_FILE, which rank 0 writes before any rank exits.
"""

from __future__ import annotations

import os
import signal
import threading

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "stopped cleanly, run me again"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    def __init__(self, step: int, signum: int | None):
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(f"stopped by {name} after step {step}; the checkpoint of step {step} is written")
        self.step = step


class PreemptionWatch:
    """`with PreemptionWatch() as watch: ... if watch.requested(): save; raise watch.stop(step)`."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._old = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _note(self, signum, frame) -> None:
        # A handler may run inside any Python call: only os.write is safe here, not logging.
        self.signum = signum
        os.write(2, f"r1stack: got {signal.Signals(signum).name}; stopping after this step\n".encode())

    def requested(self) -> bool:
        """Collective, once per step, so that all ranks stop after the same one."""
        from parallel.parallelize import all_ranks_true  # megatron loads only once a stage runs

        return not all_ranks_true(self.signum is None)

    def stop(self, step: int) -> Preempted:
        """Call after the checkpoint is written; raise what it returns."""
        from parallel.parallelize import barrier, is_rank0

        marker = os.environ.get("R1_PREEMPTED_FILE")
        if marker and is_rank0():
            with open(marker, "w") as f:
                f.write(f"{step}\n")
        barrier()  # no rank exits before the marker exists
        return Preempted(step, self.signum)
