"""Partial rollouts (rollout.partial): a step's generation is interrupted by the next weight update and goes
on, on the new weights, from where it stopped, as AReaL's interruptible generation and verl's partial rollout
do. The interrupt point is scheduled, not timed: after rollout.partial_tokens tokens of the step's first
engine call, so a run repeats exactly.

rlhf.producer drives it: `PartialBatch.start` runs the step's collect (rollout → reward) up to the interrupt,
the producer sends the next weights, `finish` runs the rest. The prefix's tokens and behaviour log-probs are
kept; every completion token carries the weight version that sampled it (Completion.token_versions).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import torch

from inference.engine import Completion, Rollout, Sampling

# Continuations sample with seed + CONTINUATION_SEED + i (i: the sample's index in its group): away from the
# per-step offsets of rlhf.rollout.sampling, so no continuation repeats another call's random stream.
CONTINUATION_SEED = 500_000


@dataclasses.dataclass
class Prefix:
    """What the interrupted call produced, enough to rebuild the step after a restart: the call's prompts and
    sampling (checked when replayed), its completions so far and the weight version that sampled them."""

    prompts: list[list[int]]
    sampling: Sampling
    rollout: Rollout
    version: int


class PartialBatch:
    """One step's `collect(engine, step, position)` on a thread of its own that runs only while the
    producer's job thread waits for it (start: up to the interrupt; finish: to the end), so the engine
    still serves one caller at a time in a fixed order. `replay`: a Prefix from a checkpoint, returned
    instead of generating it again (its weights are gone)."""

    def __init__(self, collect, engine, step: int, position: int, tokens: int, version: Callable[[], int], replay=None):
        self.step, self.position = step, position
        self.engine = _Interrupting(engine, tokens, version, self._pause, replay)
        self._run = lambda: collect(self.engine, step, position)
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._done, self._result, self._error = False, None, None

    @property
    def prefix(self) -> Prefix | None:
        return self.engine.prefix

    def start(self) -> None:
        """Runs the step up to its interrupt (or to its end, when nothing was left unfinished)."""
        threading.Thread(target=self._main, name=f"partial-rollout-{self.step}", daemon=True).start()
        self._back.acquire()
        if self._error is not None:
            raise self._error

    def finish(self):
        """Runs the rest on the weights the engine serves now; returns what collect returned."""
        if not self._done:
            self._go.release()
            self._back.acquire()
        if self._error is not None:
            raise self._error
        return self._result

    def _pause(self) -> None:
        self._back.release()
        self._go.acquire()

    def _main(self) -> None:
        try:
            self._result = self._run()
        except BaseException as e:  # noqa: BLE001  (raised on the producer's thread)
            self._error = e
        finally:
            self._done = True
            self._back.release()


class _Interrupting:
    """The engine as the step's collect sees it: its first generate stops every completion after `tokens`
    tokens, hands control back (`pause`) while new weights load, then continues the unfinished ones on them.
    Later calls (dynamic sampling's refills) run whole on the current weights."""

    def __init__(self, engine, tokens: int, version: Callable[[], int], pause: Callable[[], None], replay):
        self.inner, self.tokens, self.version, self.pause = engine, tokens, version, pause
        self.replay: Prefix | None = replay
        self.prefix: Prefix | None = None
        self.interrupted = False

    def __getattr__(self, name):  # max_model_len, timeout_s, ...: the engine's own
        return getattr(self.inner, name)

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        if self.interrupted or sampling.max_new_tokens <= self.tokens:
            return _stamped(self.inner.generate(prompts, sampling), self.version())
        self.interrupted = True
        self.prefix = self._first_part(prompts, sampling)
        self.pause()
        return self._continued(self.prefix, self.version())

    def _first_part(self, prompts, sampling: Sampling) -> Prefix:
        if self.replay is not None:
            if (self.replay.prompts, self.replay.sampling) != (prompts, sampling):
                raise RuntimeError(
                    "the checkpoint's interrupted rollouts were asked for with other prompts or sampling than "
                    "this run asks for: the config or the data changed. Fix: resume with the same ones."
                )
            return self.replay
        short = dataclasses.replace(
            sampling, max_new_tokens=self.tokens, min_new_tokens=min(sampling.min_new_tokens, self.tokens)
        )
        version = self.version()
        return Prefix(prompts, sampling, _stamped(self.inner.generate(prompts, short), version), version)

    def _continued(self, prefix: Prefix, version: int) -> Rollout:
        """The prefix's unfinished completions continued on the engine's current weights, in one call: each
        its own request (n=1), seeded apart by its index i in its group."""
        sampling, rest = prefix.sampling, prefix.sampling.max_new_tokens - self.tokens
        groups = [[dataclasses.replace(c) for c in comps] for comps in prefix.rollout.completions]
        todo = [(k, i, c) for k, comps in enumerate(groups) for i, c in enumerate(comps) if _unfinished(c, self.tokens)]
        base = sampling.seed
        more = dataclasses.replace(
            sampling,
            n=1,
            max_new_tokens=rest,
            min_new_tokens=max(sampling.min_new_tokens - self.tokens, 0),
            seed=None,
            prompt_seeds=None if base is None else tuple(base + CONTINUATION_SEED + i for _, i, _ in todo),
        )
        out = self.inner.generate([prefix.prompts[k] + c.token_ids for k, _, c in todo], more)
        for (k, i, c), [tail] in zip(todo, out.completions):
            groups[k][i] = Completion(
                c.token_ids + tail.token_ids,
                c.logprobs + tail.logprobs,
                tail.finish_reason,
                c.token_versions + [version] * len(tail.token_ids),
                *joined_tops(c, tail),
                # the continuation's prefill routed the prompt and the prefix again, on the new weights
                routed_experts=tail.routed_experts,
            )
        return Rollout(groups, prefix.rollout.truncated_prompts, prefix.rollout.prompts)


def joined_tops(head: Completion, tail: Completion) -> tuple:
    """The top log-probs (Sampling.top_logprobs) of a prefix and its continuation, one after the other
    (also a tool call's continuation, rlhf.tool_calls)."""
    if head.top_ids is None or tail.top_ids is None:
        return None, None
    return torch.cat([head.top_ids, tail.top_ids]), torch.cat([head.top_logprobs, tail.top_logprobs])


def _unfinished(c: Completion, tokens: int) -> bool:
    return c.finish_reason == "length" and len(c.token_ids) == tokens


def _stamped(rollout: Rollout, version: int) -> Rollout:
    for comps in rollout.completions:
        for c in comps:
            c.token_versions = [version] * len(c.token_ids)
    return rollout
