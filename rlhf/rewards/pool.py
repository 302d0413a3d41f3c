"""RewardPool: every configured reward for a batch of rollouts, in worker processes, each call timed out.

Why processes: math-verify times itself out with signal.alarm (main thread of a process only), sympy can
hang on adversarial input, and the trainer's main process must never wait on either. Workers come from
a forkserver: a fresh interpreter, never a fork of a parent holding torch/vLLM threads, and replacing a
hung worker forks one from the server instead of importing sympy again.

The parent sends one call at a time to each worker and times it from the send. A call past
``timeout_s`` scores 0 and is counted, and its worker is killed and replaced at once, so a hung reward
costs one worker for one timeout, never the run. A call that raises (or a worker that dies) scores 0
and is counted in ``errors``; the first traceback per reward name is logged.

``workers=0`` runs inline in the calling process, for tests and debugging. A call there cannot be
interrupted: one that returns after ``timeout_s`` is scored 0 and counted as a timeout, but one that
hangs in pure-Python code hangs the caller.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Sequence

from core.errors import ConfigError
from rlhf.rewards import REWARDS
from rlhf.tasks import modules_of_scorers

WORKER_SIGNALS = "rlhf.rewards.worker_signals"

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing sympy, math-verify, reasoning-gym on a busy machine


@dataclass
class RewardResult:
    total: list[float]  # weighted sum per sample
    per_reward: dict[str, list[float]]  # unweighted, per sample
    errors: dict[str, int]  # calls that raised (or whose worker died), scored 0
    timeouts: dict[str, int]  # calls past timeout_s, scored 0


def call_reward(name: str, completion: str, sample: dict) -> tuple[str, float | str]:
    """("ok", value) or ("error", traceback summary). Runs in a worker or inline."""
    try:
        value = float(REWARDS[name](completion, sample))
        if not math.isfinite(value):
            raise ValueError(f"reward {name!r} returned {value}; a reward must be a finite number")
        return "ok", value
    except Exception as e:  # a reward bug must cost its sample, not the batch
        return "error", "".join(traceback.format_exception(e, limit=-3))


def _serve(conn, modules: list[str]) -> None:
    try:
        for name in modules:
            importlib.import_module(name)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if call is None:
            return
        conn.send(call_reward(*call))


class _Worker:
    def __init__(self, ctx, modules: list[str]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, modules), name="reward-worker", daemon=True)
        self.proc.start()
        child.close()  # so the worker's death reads as EOF here
        self.ready = False
        self.call: tuple[int, str] | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, call: tuple[int, str], payload: tuple, timeout_s: float) -> None:
        data = ForkingPickler.dumps(payload)  # first, so an unpicklable sample leaves the worker idle
        self.call, self.deadline = call, time.monotonic() + timeout_s
        self.conn.send_bytes(data)

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5.0)
        self.conn.close()


def _check(weights: dict[str, float], timeout_s: float, workers: int) -> None:
    if not weights:
        raise ConfigError(f"reward.weights is empty. Fix: weight at least one of {sorted(REWARDS)}, e.g. accuracy: 1.0")
    unknown = [k for k in weights if k not in REWARDS]
    if unknown:
        raise ConfigError(
            f"reward.weights has unknown reward(s) {unknown}; registered: {sorted(REWARDS)}. "
            "Fix: correct the key, or import the module that registers it (@rlhf.rewards.REWARDS.register)"
        )
    if timeout_s <= 0 or workers < 0:
        raise ConfigError(
            f"reward.timeout_s={timeout_s}, reward.workers={workers}. "
            "Fix: timeout_s > 0, workers >= 0 (0 = inline, no enforced timeout)."
        )


class RewardPool:
    """``pool.score(completions, samples)`` → RewardResult. Start-up is lazy; the workers are reused
    across calls until ``close()`` (or the end of a ``with`` block).

    ``modules``: extra modules each worker imports; the modules defining the configured rewards are
    always imported, so a reward registered in any importable module works.
    """

    def __init__(
        self,
        weights: dict[str, float],
        timeout_s: float = 5.0,
        workers: int = 2,
        modules: Sequence[str] = (),
        start_method: str = "forkserver",
    ):
        _check(weights, timeout_s, workers)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.timeout_s, self.workers = float(timeout_s), int(workers)
        # The rewards' modules and every task scorer's (accuracy asks the task), so one registered anywhere works.
        self.modules = sorted({REWARDS[k].__module__ for k in weights} | set(modules_of_scorers()) | set(modules))
        self.start_method = start_method
        self._workers: list[_Worker] = []
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, reward_cfg, modules: Sequence[str] = ()) -> RewardPool:
        return cls(dict(reward_cfg.weights), reward_cfg.timeout_s, reward_cfg.workers, modules)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def score(self, completions: Sequence[str], samples: Sequence[dict]) -> RewardResult:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples; pass one per completion")
        names, n = list(self.weights), len(samples)
        out = RewardResult([], {k: [0.0] * n for k in names}, dict.fromkeys(names, 0), dict.fromkeys(names, 0))
        calls = [(i, name) for i in range(len(samples)) for name in names]
        if self.workers == 0:
            self._run_inline(calls, completions, samples, out)
        else:
            self._run_workers(calls, completions, samples, out)
        out.total = [sum(w * out.per_reward[k][i] for k, w in self.weights.items()) for i in range(len(samples))]
        return out

    def _record(self, out: RewardResult, call: tuple[int, str], status: str, payload) -> None:
        i, name = call
        if status == "ok":
            out.per_reward[name][i] = payload
            return
        counts = out.timeouts if status == "timeout" else out.errors
        counts[name] += 1
        if name not in self._logged:  # once per reward: a bad reward would otherwise flood the log
            self._logged.add(name)
            if status == "timeout":
                log.warning(
                    "reward %r: a call ran past %.1f s; scored 0, its worker replaced (counted in "
                    "timeouts, logged once per reward)",
                    name,
                    self.timeout_s,
                )
            else:
                log.error("reward %r failed; scored 0 (counted in errors, logged once per reward):\n%s", name, payload)

    def _run_inline(self, calls, completions, samples, out: RewardResult) -> None:
        for call in calls:
            i, name = call
            start = time.monotonic()
            status, payload = call_reward(name, completions[i], samples[i])
            if time.monotonic() - start > self.timeout_s:
                status = "timeout"
            self._record(out, call, status, payload)

    def _start(self) -> None:
        if self._workers:
            return
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(self._imports())  # a no-op once the server runs; workers import anyway
        self._workers = [_Worker(ctx, self._imports()) for _ in range(self.workers)]

    def _replace(self, k: int) -> None:
        self._workers[k].stop(kill=True)
        self._workers[k] = _Worker(mp.get_context(self.start_method), self._imports())

    def _imports(self) -> list[str]:
        """What a worker imports, WORKER_SIGNALS first: it ignores the trainer's stop signals before any
        reward code runs (and in the forkserver, for every worker forked from it)."""
        return [WORKER_SIGNALS, *self.modules]

    def _run_workers(self, calls, completions, samples, out: RewardResult) -> None:
        self._start()
        for k, w in enumerate(self._workers):
            if w.call:  # left busy by an interrupted batch: its late result would land in this one
                self._replace(k)
        todo = deque(calls)
        while todo or any(w.call for w in self._workers):
            self._dispatch(todo, completions, samples, out)
            waiting = [w for w in self._workers if w.call or not w.ready]
            if not waiting:  # the last sends failed: nothing in flight
                break
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = set(wait([w.conn for w in self._workers], timeout=timeout))
            for k, w in enumerate(self._workers):
                if w.conn in ready:
                    self._receive(k, w, out)
            now = time.monotonic()
            for k, w in enumerate(self._workers):
                if w.call and now > w.deadline:
                    self._record(out, w.call, "timeout", None)
                    self._replace(k)
                elif not w.ready and now > w.deadline:
                    self.close()
                    raise RuntimeError(
                        f"a reward worker did not start in {STARTUP_TIMEOUT_S:.0f} s (importing {self.modules})"
                    )

    def _dispatch(self, todo: deque, completions, samples, out: RewardResult) -> None:
        """One call to each idle worker."""
        for k in range(len(self._workers)):
            while todo and self._workers[k].ready and self._workers[k].call is None:
                i, name = call = todo.popleft()
                try:
                    self._workers[k].send(call, (name, completions[i], samples[i]), self.timeout_s)
                except OSError:  # the worker just died: the call goes to its replacement
                    todo.appendleft(call)
                    self._replace(k)
                except Exception as e:  # the sample does not pickle (a lambda in metadata, ...)
                    self._record(out, call, "error", f"cannot send the sample to a worker: {e!r}")

    def _receive(self, k: int, w: _Worker, out: RewardResult) -> None:
        try:
            status, payload = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(timeout=1.0)
            code = w.proc.exitcode
            if not w.ready:  # dying while importing would only die again: stop here
                self.close()
                raise RuntimeError(
                    f"a reward worker exited (code {code}) while starting (importing the main module, then "
                    f"{self.modules}); see its traceback above. A script that scores rewards needs the "
                    "`if __name__ == '__main__':` guard: workers re-import the main module"
                )
            if w.call:
                self._record(out, w.call, "error", f"the worker running it exited (exit code {code})")
            self._replace(k)
            return
        if status == "ready":
            w.ready = True
        elif status == "init_error":
            self.close()
            raise RuntimeError(f"a reward worker failed to import {self.modules}; fix the import error:\n{payload}")
        elif w.call is not None:
            self._record(out, w.call, status, payload)
            w.call = None
