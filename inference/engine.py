"""The rollout engine interface and its registry.

Prompts go in as token ids, completions come out as token ids with per-token logprobs: the trainer's
tokenizer is the only tokenizer, so the engine can never tokenize differently from the trainer.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

log = logging.getLogger("r1stack.inference")


class EngineError(RuntimeError):
    """The engine failed, hung, or was given input it cannot serve; the message says which."""


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
    """Implementations: `generate`, `update_weights`; `sleep`/`wake_up`/`shutdown` where meaningful."""

    max_model_len: int
    timeout_s: float = 0.0  # generate/update_weights past this raise EngineError (see `deadline`); 0 = none

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        """n completions per prompt, with the engine's per-token logprobs."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the served weights with the full HF-named state (never a subset: tied heads)."""

    def sleep(self) -> None:
        """Frees the KV cache (and offloads weights) while the trainer runs."""

    def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def fit_prompts(self, prompts: list[list[int]], sampling: Sampling, policy: str) -> tuple[list[list[int]], list[int]]:
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


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raises EngineError in the main thread if the block runs past `seconds` (0 = no limit): a hung
    in-process engine becomes a clear error instead of a silent hang. SIGALRM, so main thread only."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise EngineError(f"{what} did not finish within {seconds:g} s: the engine hung or is far slower than "
                          "expected. Fix: check the log above, or raise rollout.timeout_s.")  # fmt: skip

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str):
    def add(factory):
        ENGINES[name] = factory
        return factory

    return add


def build_engine(name: str, timeout_s: float = 0.0, **kwargs) -> Engine:
    # Importing the implementations registers them; vLLM is imported only when chosen.
    from inference import hf_engine, vllm_engine  # noqa: F401

    if name not in ENGINES:
        raise EngineError(f"unknown rollout.engine {name!r}. Fix: use one of {sorted(ENGINES)}.")
    engine = ENGINES[name](**kwargs)
    engine.timeout_s = timeout_s
    return engine
