"""The rollout engine interface and its registry.

Prompts go in as token ids, completions come out as token ids with per-token logprobs: the trainer's
tokenizer is the only tokenizer, so the engine can never tokenize differently from the trainer.

Failing loudly: every `generate` and `update_weights` of an engine runs under a watch (`deadline`): past
`timeout_s` it raises EngineTimeout; when the engine dies (its process exits, `dead_reason()` says why,
or the engine raises vLLM's EngineDeadError) it raises EngineDied within about POLL_S instead of
waiting on a process that will never answer. A dead engine is restarted once (`restart()`: built again
with its constructor's arguments) and the call retried, when that is safe: a restarted engine
serves the weights it started with, so after a weight update it is restarted only when
`weights_source` can send the current ones again.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from core.registry import Registry

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


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None  # per call: the same seed and weights give the same completions
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log π(token | prefix) at the sampling temperature (before top-p), one per token
    finish_reason: str  # "stop" (a stop token) or "length"


@dataclass
class Rollout:
    """All completions of one call: `completions[i]` holds the n samples of prompt i."""

    completions: list[list[Completion]]
    truncated_prompts: list[int] = field(default_factory=list)  # prompt indices cut to fit the context


class Engine(abc.ABC):
    """Implementations: `generate`, `update_weights`; `sleep`/`wake_up`/`shutdown` where meaningful;
    `dead_reason` (and `restart`, when rebuilding from the constructor's arguments is not enough) for
    an engine that can die apart from the trainer. A subclass's `generate` and `update_weights` are
    wrapped by `_guarded` (deadline, death detection, one restart) when the class is defined."""

    name: str = "rollout"  # the registry name; build_engine sets it
    max_model_len: int
    timeout_s: float = 0.0  # generate/update_weights past this raise EngineTimeout; 0 = none
    max_restarts: int = 1  # automatic restarts after the engine dies; 0 = fail at the first death
    # The full HF-named state the trainer would send now (e.g. `lambda: export_hf(policy)` when that is
    # not collective). With it a dead engine is restarted even after weight updates; without it, only
    # while it still serves its start-up weights.
    weights_source: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None
    _init_args: tuple[tuple, dict] = ((), {})  # what the engine was built with; restart() builds it again so

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)
        for call in ("generate", "update_weights"):
            fn = cls.__dict__.get(call)
            if fn is not None and not getattr(fn, "__isabstractmethod__", False) and not hasattr(fn, "_guarded"):
                setattr(cls, call, _guarded(call, fn))

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        """n completions per prompt, with the engine's per-token logprobs."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the served weights with the full HF-named state (never a subset: tied heads)."""

    def sleep(self) -> None:
        """Frees the KV cache (and offloads weights) while the trainer runs."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Takes back what sleep freed: `tags` "weights" and/or "kv_cache" (vLLM's), all when None."""

    def shutdown(self) -> None:
        pass

    def dead_reason(self) -> str | None:
        """None while the engine can serve, else why not; polled every POLL_S during a call, from another
        thread (so only read flags here). Engines that cannot die apart from the trainer keep this."""
        return None

    def restart(self) -> None:
        """Brings a dead engine back, serving the weights it started with. Default: shut it down and run
        the constructor again with the arguments it got."""
        args, kwargs = self._init_args
        with contextlib.suppress(Exception):  # it is dead: shutting it down may fail too
            self.shutdown()
        type(self).__init__(self, *args, **kwargs)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def fit_prompts(
        self, prompts: list[list[int]], sampling: Sampling, policy: str
    ) -> tuple[list[list[int]], list[int]]:
        """Applies the over-long prompt policy: 'error' names the prompt; 'truncate' keeps its tail."""
        room = self.max_model_len - sampling.max_new_tokens
        if room < 1:
            raise EngineError(
                f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the context of "
                f"{self.max_model_len} tokens. Fix: lower rollout.max_new_tokens or raise the context length."
            )
        fitted, truncated = [], []
        for i, p in enumerate(prompts):
            if not p:
                raise EngineError(f"prompt {i} is empty")
            if len(p) > room:
                if policy != "truncate":
                    raise EngineError(
                        f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} the "
                        f"context of {self.max_model_len} leaves {room}. Fix: shorten it, or set "
                        "rollout.overlong_prompt=truncate."
                    )
                p = p[-room:]
                truncated.append(i)
            fitted.append(p)
        return fitted, truncated

    # ---------------------------------------------------------------- the guard around every call

    def _describe(self, call: str, args: tuple) -> str:
        if call == "generate" and len(args) >= 2:
            n = len(args[0])
            return (
                f"the {self.name} engine's generate ({n} prompt{'s' if n != 1 else ''} × "
                f"{getattr(args[1], 'n', '?')} samples)"
            )
        return f"the {self.name} engine's {call.replace('_', ' ')}"

    def _guarded_call(self, call: str, fn, args: tuple, kwargs: dict):
        what = self._describe(call, args)
        try:
            with deadline(self.timeout_s, what, dead_reason=self.dead_reason):
                result = fn(self, *args, **kwargs)
        except Exception as e:
            why = self._death(e)
            if why is None:
                raise
            refusal = self._restart_refusal(call)
            if refusal is not None:
                raise EngineDied(f"{what} failed: the engine died: {why}.{refusal} {FIX_DEAD}", why) from e
            self._restarts = self.__dict__.get("_restarts", 0) + 1
            log.warning(
                "%s failed: the engine died: %s. Restarting it (restart %d of %d) and retrying the call.",
                what,
                why,
                self._restarts,
                self.max_restarts,
            )
            try:
                with deadline(self.timeout_s, f"restarting the {self.name} engine"):
                    self.restart()
                    if self.__dict__.get("_weights_updated") or call == "update_weights":
                        self.update_weights(self.weights_source())  # inside the guard: straight to the engine
            except Exception as failed:
                raise EngineDied(
                    f"{what} failed: the engine died: {why}. Restarting it failed too: "
                    f"{type(failed).__name__}: {failed}. {FIX_DEAD}",
                    why,
                ) from failed
            if call == "update_weights":  # the weights it was sending are the ones just sent
                self._weights_updated = True
                return None
            try:
                with deadline(self.timeout_s, what, dead_reason=self.dead_reason):
                    result = fn(self, *args, **kwargs)
            except Exception as again:
                why_again = self._death(again)
                if why_again is None:
                    raise
                raise EngineDied(
                    f"{what} failed: the engine died ({why}), was restarted automatically, and "
                    f"died again: {why_again}. {FIX_DEAD}",
                    why_again,
                ) from again
        if call == "update_weights":
            self._weights_updated = True
        return result

    def _death(self, error: BaseException) -> str | None:
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
            reason = self.dead_reason()
        if reason:
            return reason
        if any(type(e).__name__ == "EngineDeadError" for e in chain):  # vLLM's: the engine core is gone
            return f"vLLM raised EngineDeadError ({chain[-1]})"
        return None

    def _restart_refusal(self, call: str) -> str | None:
        """None when a restart may follow, else the sentence that says why not."""
        done = self.__dict__.get("_restarts", 0)
        if done >= self.max_restarts:
            return (
                f" It had already been restarted automatically {'once' if done == 1 else f'{done} times'} "
                f"(max_restarts={self.max_restarts})."
                if done
                else ""
            )
        if self.weights_source is None and (call == "update_weights" or self.__dict__.get("_weights_updated")):
            return (
                " It was not restarted: a restarted engine would serve its start-up weights, not the trained "
                "ones (no weights_source to send them again)."
            )
        return None


def _recording(init):
    @functools.wraps(init)
    def recording(self, *args, **kwargs):
        if type(self).__init__ is recording:  # the outermost constructor, not a subclass's super().__init__
            self._init_args = (args, kwargs)
        init(self, *args, **kwargs)

    return recording


def _guarded(call: str, fn):
    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        if self.__dict__.get("_in_call"):  # a subclass calling super().generate(): one guard is enough
            return fn(self, *args, **kwargs)
        self._in_call = True
        try:
            return self._guarded_call(call, fn, args, kwargs)
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


# Engine factories by rollout.engine name; importing the implementations registers them (vLLM itself is
# imported only when its engine is built).
ENGINES: Registry[Callable[..., Engine]] = Registry(
    "rollout engine", "rollout.engine", modules=("inference.hf_engine", "inference.vllm_engine")
)


def build_engine(name: str, timeout_s: float = 0.0, max_restarts: int = 1, **kwargs) -> Engine:
    engine = ENGINES.get(name)(**kwargs)
    engine.name, engine.timeout_s, engine.max_restarts = name, timeout_s, max_restarts
    return engine
