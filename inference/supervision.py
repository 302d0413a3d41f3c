"""How an engine call fails loudly instead of hanging: every `generate` and `update_weights` runs under a
watch (`deadline`): past the engine's `timeout_s` it raises EngineTimeout; when the engine dies (its process
exits, `dead_reason()` says why, or the engine raises vLLM's EngineDeadError) it raises EngineDied within
about POLL_S. A dead engine is restarted once (`restart()`: built again with its constructor's arguments)
and the call retried, when that is safe: a restarted engine serves the weights it started with, so after a
weight update it is restarted only when `weights_source` can send the current ones again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from typing import Callable

log = logging.getLogger("r1stack.inference")

POLL_S = 0.25  # how often a running call checks that its engine is still alive
FIX_DEAD = (
    "Fix: find the cause in the log above (an out-of-memory kill, a crashed kernel or worker), then run the "
    "same command again: the run resumes from its last checkpoint."
)


class EngineError(RuntimeError):
    """The engine failed, hung, or was given input it cannot serve; the message says which."""


class EngineTimeout(EngineError):
    """A call ran past the engine's timeout_s (rollout.timeout_s)."""


class EngineDied(EngineError):
    """The engine can no longer serve: its process exited (or its model is gone)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason  # why it is dead, in a few words


def _describe(engine, call: str, args: tuple) -> str:
    if call == "generate" and len(args) >= 2:
        n = len(args[0])
        return (
            f"the {engine.name} engine's generate ({n} prompt{'s' if n != 1 else ''} × "
            f"{getattr(args[1], 'n', '?')} samples)"
        )
    return f"the {engine.name} engine's {call.replace('_', ' ')}"


def _guarded_call(engine, call: str, fn, args: tuple, kwargs: dict):
    what = _describe(engine, call, args)
    try:
        with deadline(engine.timeout_s, what, dead_reason=engine.dead_reason):
            result = fn(engine, *args, **kwargs)
    except Exception as e:
        why = _death(engine, e)
        if why is None:
            raise
        refusal = _restart_refusal(engine, call)
        if refusal is not None:
            raise EngineDied(f"{what} failed: the engine died: {why}.{refusal} {FIX_DEAD}", why) from e
        engine._restarts = engine.__dict__.get("_restarts", 0) + 1
        log.warning(
            "%s failed: the engine died: %s. Restarting it (restart %d of %d) and retrying the call.",
            what,
            why,
            engine._restarts,
            engine.max_restarts,
        )
        try:
            with deadline(engine.timeout_s, f"restarting the {engine.name} engine"):
                engine.restart()
                if engine.__dict__.get("_weights_updated") or call == "update_weights":
                    engine.update_weights(engine.weights_source())  # inside the guard: straight to the engine
        except Exception as failed:
            raise EngineDied(
                f"{what} failed: the engine died: {why}. Restarting it failed too: "
                f"{type(failed).__name__}: {failed}. {FIX_DEAD}",
                why,
            ) from failed
        if call == "update_weights":  # the weights it was sending are the ones just sent
            engine._weights_updated = True
            return None
        try:
            with deadline(engine.timeout_s, what, dead_reason=engine.dead_reason):
                result = fn(engine, *args, **kwargs)
        except Exception as again:
            why_again = _death(engine, again)
            if why_again is None:
                raise
            raise EngineDied(
                f"{what} failed: the engine died ({why}), was restarted automatically, and "
                f"died again: {why_again}. {FIX_DEAD}",
                why_again,
            ) from again
    if call == "update_weights":
        engine._weights_updated = True
    return result


def _death(engine, error: BaseException) -> str | None:
    """Why the engine is dead if `error` means it died, else None. A timeout is re-raised as itself,
    however the engine wrapped it."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, EngineTimeout):
            if e is not error:  # the engine wrapped our timeout: give the user ours
                raise e from None
            return None
        if isinstance(e, EngineDied):
            return e.reason or str(e)
    reason = None
    with contextlib.suppress(Exception):
        reason = engine.dead_reason()
    if reason:
        return reason
    if any(type(e).__name__ == "EngineDeadError" for e in chain):  # vLLM's: the engine core is gone
        return f"vLLM raised EngineDeadError ({chain[-1]})"
    return None


def _restart_refusal(engine, call: str) -> str | None:
    """None when a restart may follow, else the sentence that says why not."""
    done = engine.__dict__.get("_restarts", 0)
    if done >= engine.max_restarts:
        return (
            f" It had already been restarted automatically {'once' if done == 1 else f'{done} times'} "
            f"(max_restarts={engine.max_restarts})."
            if done
            else ""
        )
    if engine.weights_source is None and (call == "update_weights" or engine.__dict__.get("_weights_updated")):
        return (
            " It was not restarted: a restarted engine would serve its start-up weights, not the trained "
            "ones (no weights_source to send them again)."
        )
    return None


def recording(init):
    """Wraps an engine class's __init__ so the instance keeps the arguments of its outermost constructor."""

    @functools.wraps(init)
    def recording(self, *args, **kwargs):
        if type(self).__init__ is recording:  # the outermost constructor, not a subclass's super().__init__
            self._init_args = (args, kwargs)
        init(self, *args, **kwargs)

    return recording


def guarded(call: str, fn):
    """Wraps an engine's generate/update_weights in the deadline, death detection and one restart."""

    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        if self.__dict__.get("_in_call"):  # a subclass calling super().generate(): one guard is enough
            return fn(self, *args, **kwargs)
        self._in_call = True
        try:
            return _guarded_call(self, call, fn, args, kwargs)
        finally:
            self._in_call = False

    guarded._guarded = True
    return guarded


def exit_code(code) -> str:
    if isinstance(code, int) and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# ---------------------------------------------------------------- deadlines


class _Watch:
    def __init__(self, seconds: float, what: str, dead_reason: Callable[[], str | None] | None):
        self.seconds, self.what, self.dead_reason = seconds, what, dead_reason
        self.start = time.monotonic()
        self.done = threading.Event()
        self.error: EngineError | None = None
        self.sent = self.delivered = self.closing = False


_active: list[_Watch] = []
_lock = threading.Lock()
_previous_handler = None


def _on_alarm(signum, frame):
    for w in _active:
        if w.sent and not w.delivered:
            w.delivered = True
            if not w.closing:  # once the block is over, a late signal raises nothing
                raise w.error


def _watch(w: _Watch, main_thread_id: int) -> None:
    while True:
        wait = POLL_S if w.dead_reason else None
        if w.seconds:
            left = w.seconds - (time.monotonic() - w.start)
            wait = left if wait is None else min(wait, left)
        if w.done.wait(max(wait, 0.0)):
            return
        error = None
        if w.dead_reason is not None:
            try:
                why = w.dead_reason()
            except Exception:  # noqa: BLE001  (a failing check must not stop a healthy call)
                why = None
            if why:
                error = EngineDied(f"{w.what} failed: the engine died: {why}. {FIX_DEAD}", why)
        if error is None and w.seconds and time.monotonic() - w.start >= w.seconds:
            error = EngineTimeout(
                f"{w.what} did not finish within {w.seconds:g} s: the engine hung or is far slower "
                "than expected. Fix: check the log above, or raise rollout.timeout_s."
            )
        if error is not None:
            with _lock:
                if not w.done.is_set():
                    w.error, w.sent = error, True
                    signal.pthread_kill(main_thread_id, signal.SIGALRM)
            return


@contextlib.contextmanager
def deadline(seconds: float, what: str, dead_reason: Callable[[], str | None] | None = None):
    """Raises EngineTimeout in the main thread if the block runs past `seconds` (0 = no limit), and
    EngineDied as soon as `dead_reason()` (polled every POLL_S) returns one: a hung or dead engine becomes
    a clear error instead of a silent hang. A watcher thread signals the main thread (SIGALRM, sent to
    it alone), so it works in the main thread only; blocks may nest."""
    global _previous_handler
    if (not seconds and dead_reason is None) or threading.current_thread() is not threading.main_thread():
        yield
        return
    w = _Watch(seconds, what, dead_reason)
    watcher = threading.Thread(target=_watch, args=(w, threading.get_ident()), name="engine-watch", daemon=True)
    try:  # from here on an outer block's signal may land anywhere: the cleanup below copes
        if not _active:
            _previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        _active.append(w)
        watcher.start()
        yield
    finally:
        try:
            w.closing = True
        finally:  # runs even if the signal lands on the line above: the handler raises once at most
            _close(w, watcher)


def _close(w: _Watch, watcher: threading.Thread) -> None:
    with _lock:
        w.done.set()
        sent = w.sent
    end = time.monotonic() + 2.0
    while sent and not w.delivered and time.monotonic() < end:
        time.sleep(0.001)  # the signal is on its way: let the handler take it (it raises nothing now)
    if watcher.ident is not None:
        watcher.join(timeout=1.0)
    if w in _active:
        _active.remove(w)
    if not _active:  # None: a handler installed outside Python, which cannot be put back from here
        signal.signal(signal.SIGALRM, signal.SIG_DFL if _previous_handler is None else _previous_handler)
