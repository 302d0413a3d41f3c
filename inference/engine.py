"""The rollout engine interface and its registry.

Prompts go in as token ids, completions come out as token ids with per-token logprobs: the trainer's
tokenizer is the only tokenizer, so the engine can never tokenize differently from the trainer. Every
engine's `generate` and `update_weights` run supervised (inference.supervision): a hung or dead engine
becomes a clear error, and a dead one is restarted once when that is safe.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from core.registry import Registry
from inference.supervision import EngineError, guarded, recording


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # stop tokens masked before this many (rollout.min_new_tokens)
    seed: int | None = None  # per call: the same seed and weights give the same completions
    # One seed per prompt in place of `seed` (n=1: continuations, each seeded apart, in one call); vllm only
    prompt_seeds: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Per token, also the k most likely tokens and their log-probs (the mismatch oracle, rlhf.consistency);
    # -1: the whole vocabulary; 0: none.
    top_logprobs: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    # log π(token | prefix) at the sampling temperature, one per token. With top_p < 1 vLLM's are within the
    # nucleus it samples from (its processed_logprobs), the HF engine's before top-p, as the trainer's.
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token) or "length"
    token_versions: list[int] = field(default_factory=list)  # per token, where the caller tracks weight versions
    # With Sampling.top_logprobs: per token the k most likely ids [tokens, k] (int32, most likely first)
    # and their log-probs [tokens, k], at the sampling temperature as `logprobs`. Left out of == (a tensor's
    # == is elementwise): what they describe, the tokens and their log-probs, compare.
    top_ids: torch.Tensor | None = field(default=None, compare=False)
    top_logprobs: torch.Tensor | None = field(default=None, compare=False)
    # MoE engines recording their routing: the experts each layer routed every position to that the
    # trainer's forward reads (the prompt and all but the last token), [positions, MoE layers, top-k] int16
    routed_experts: torch.Tensor | None = field(default=None, compare=False)
    # Tool-integrated rollouts (rlhf.tool_calls): 1 per token the tool wrote (not sampled: masked out of the
    # loss), 0 per sampled one; empty when no tool ran. And each call's outcome (ok, error, timeout, ...).
    tool_mask: list[int] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)


@dataclass
class Rollout:
    """All completions of one call: `completions[i]` holds the n samples of prompt i."""

    completions: list[list[Completion]]
    truncated_prompts: list[int] = field(default_factory=list)  # prompt indices cut to fit the context
    # The prompts as the engine read them (an over-long one cut to its tail): what the completions follow,
    # so what the trainer must score them after.
    prompts: list[list[int]] = field(default_factory=list)


class Engine(abc.ABC):
    """Implementations: `generate`, `update_weights`, `score`; `sleep`/`wake_up`/`shutdown` where meaningful;
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
            cls.__init__ = recording(cls.__init__)
        for call in ("generate", "update_weights"):
            fn = cls.__dict__.get(call)
            if fn is not None and not getattr(fn, "__isabstractmethod__", False) and not hasattr(fn, "_guarded"):
                setattr(cls, call, guarded(call, fn))

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        """n completions per prompt, with the engine's per-token logprobs."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict | None:
        """Replaces the served weights with the full HF-named state (never a subset: tied heads), or raises
        inference.refit.RefitError leaving them as they were. Returns the receipt: what arrived (tensors,
        buckets) and the seconds of its transfer, load and post-processing, as far as the engine has them."""

    @abc.abstractmethod
    def score(self, tokens: list[int]) -> list[float]:
        """log p(tokens[i] | tokens[:i]) for i ≥ 1 at temperature 1, under the served weights (the refit
        probe compares them with the trainer's)."""

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


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most bucket_bytes each (a bigger tensor is a bucket alone)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t.contiguous()))
        size += nbytes
    if bucket:
        yield bucket


# Engine factories by rollout.engine name; importing the implementations registers them (vLLM itself is
# imported only when its engine is built).
ENGINES: Registry[Callable[..., Engine]] = Registry(
    "rollout engine", "rollout.engine", modules=("inference.hf_engine", "inference.vllm_engine")
)


def build_engine(name: str, timeout_s: float = 0.0, max_restarts: int = 1, **kwargs) -> Engine:
    engine = ENGINES.get(name)(**kwargs)
    engine.name, engine.timeout_s, engine.max_restarts = name, timeout_s, max_restarts
    return engine
