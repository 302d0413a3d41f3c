"""Tool-integrated reasoning: rollouts that stop at a tool call, run it, append its output and go on.

A completion that samples the closing call tag (``</tool>``, rollout.tool_tags[1]) stops there. The call is
the text between the last opening tag and that one; ``rollout.tool`` runs it (``python``: the code sandbox
of rlhf.rewards.sandbox, no network, rlimits, a deadline) and its output comes back between the output tags
(``<output>…</output>``), at most rollout.tool_output_tokens tokens. The sample then continues from its own
ids, up to rollout.max_tool_calls calls, within the one rollout.max_new_tokens budget that tool tokens share
with the policy's.

Token ids flow through unchanged: a continuation's prompt is the prompt's ids + the engine's sampled ids +
the tool's, never a re-encoding of decoded text (re-encoding can merge or split tokens the policy never
sampled that way). The tool's tokens are marked (Completion.tool_mask): the loss, the KL and the length
metrics leave them out; their behaviour log-probs are placeholders (0) that nothing reads.

Each continuation is its own engine request seeded from the call's seed, the turn and the sample's index
in its group (samples of one group whose calls were alike would otherwise continue alike), so a step's
rollouts repeat exactly. One engine call serves the continuations of one sample index that have used the
same number of tokens (so the same remaining budget), which keeps every request inside the context.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from core.errors import ConfigError
from core.ledger import phase
from core.registry import Registry
from inference.engine import Completion, Rollout, Sampling
from rlhf.partial import joined_tops

# Continuations sample with seed + TOOL_SEED + turn × n + i: apart from rlhf.rollout's per-step offsets and
# from partial rollouts' continuations (rlhf.partial.CONTINUATION_SEED), which tool calls never run with.
TOOL_SEED = 200_000
SANDBOX_OUTPUT_BYTES = 64 * 1024  # more stdout than this is cut by the sandbox; the token cap cuts far below


@dataclass(frozen=True)
class ToolOutput:
    text: str
    status: str  # ok | error | timeout | killed | output_limit | unavailable (rlhf.rewards.sandbox.Result)


TOOLS: Registry[Callable[[str, float], ToolOutput]] = Registry("tool", "rollout.tool")


@TOOLS.register("python")
def python(program: str, timeout_s: float) -> ToolOutput:
    """The program's standard output, or what went wrong: the last line of its traceback, or the limit it hit."""
    import math

    from rlhf.rewards.sandbox import Limits, run_python

    limits = Limits(wall_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)), output_bytes=SANDBOX_OUTPUT_BYTES)
    r = run_python(program, limits=limits)
    out = r.stdout.decode("utf-8", errors="replace")
    if r.status == "ok":
        return ToolOutput(out, "ok")
    lines = r.stderr.decode("utf-8", errors="replace").strip().splitlines()
    why = {
        "timeout": f"the program ran past {timeout_s:g} s",
        "output_limit": f"the program printed more than {SANDBOX_OUTPUT_BYTES} bytes",
    }.get(r.status, lines[-1] if lines else f"exit status {r.returncode}")
    return ToolOutput(f"{out}{r.status}: {why}", r.status)


@dataclass
class ToolRunner:
    """The tool loop of one run: its tag ids, the tool, the limits (rollout.max_tool_calls, ...)."""

    tok: object
    tool: Callable[[str, float], ToolOutput]
    call_open: int
    call_close: int
    output_open: int
    output_close: int
    max_calls: int
    timeout_s: float
    output_tokens: int
    workers: int = 2

    @classmethod
    def from_config(cls, r, tok, workers: int = 2) -> ToolRunner | None:
        """None when rollout.max_tool_calls is 0; else the runner, its tags checked against the tokenizer."""
        if r.max_tool_calls == 0:
            return None
        check_config(r)
        ids = [tag_id(tok, tag, f"rollout.tool_tags[{i}]") for i, tag in enumerate(r.tool_tags)]
        return cls(tok, TOOLS.get(r.tool), *ids, r.max_tool_calls, r.tool_timeout_s, r.tool_output_tokens, workers)

    def sampling(self, s: Sampling) -> Sampling:
        """`s` stopping at a closed call too."""
        return dataclasses.replace(s, stop_token_ids=tuple(sorted({*s.stop_token_ids, self.call_close})))

    def generate(self, engine, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        """engine.generate with the tool: each completion's calls run and answered, up to max_calls."""
        s = self.sampling(sampling)
        first = engine.generate(prompts, s)
        prompts = first.prompts or prompts
        groups = [[_begun(c) for c in comps] for comps in first.completions]
        for turn in range(self.max_calls):
            calling = [(k, i) for k, comps in enumerate(groups) for i, c in enumerate(comps) if self._called(c)]
            if not calling:
                break
            outputs = self.run([self.program(prompts[k] + groups[k][i].token_ids) for k, i in calling])
            todo: dict[tuple[int, int], list[int]] = {}
            for (k, i), out in zip(calling, outputs):
                c = groups[k][i]
                self._append(c, out, s.max_new_tokens)
                if len(c.token_ids) < s.max_new_tokens:
                    todo.setdefault((i, len(c.token_ids)), []).append(k)
            for (i, used), ks in sorted(todo.items()):
                more = dataclasses.replace(
                    s,
                    n=1,
                    max_new_tokens=s.max_new_tokens - used,
                    min_new_tokens=max(s.min_new_tokens - used, 0),
                    seed=None if s.seed is None else s.seed + TOOL_SEED + turn * s.n + i,
                )
                out = engine.generate([prompts[k] + groups[k][i].token_ids for k in ks], more)
                for k, [tail] in zip(ks, out.completions):
                    groups[k][i] = _joined(groups[k][i], tail)
        for comps in groups:
            for c in comps:
                if self._called(c):  # a call past max_calls: not run, the sample ends at it
                    c.tool_calls.append("over_limit")
                elif self._open_call(c):
                    c.tool_calls.append("unclosed")
        return Rollout(groups, first.truncated_prompts, prompts)

    def run(self, programs: list[str | None]) -> list[ToolOutput | None]:
        """Every program of a turn, `workers` at a time (each runs in a sandbox process of its own, so
        threads waiting on them suffice); a program written alike by several samples runs once."""
        unique = list(dict.fromkeys(p for p in programs if p is not None))
        with phase("tools"), ThreadPoolExecutor(max(1, self.workers)) as pool:
            done = dict(zip(unique, pool.map(lambda p: self.tool(p, self.timeout_s), unique)))
        return [done.get(p) for p in programs]

    def program(self, context: list[int]) -> str | None:
        """The text of the call that `context` (a prompt and its completion so far) ends by closing, or None
        when no opening tag follows the last call (the prompt may open it). Tags inside the call are its text."""
        ids = context[:-1]
        start = _last(ids, self.call_open)
        if start < 0 or start < _last(ids, self.call_close):
            return None
        return self.tok.decode(ids[start + 1 :], skip_special_tokens=True)

    def output_ids(self, out: ToolOutput) -> tuple[list[int], bool]:
        """The output as the tokens appended, and whether it was cut to output_tokens."""
        body = self.tok.encode(escape(out.text, self.tok), add_special_tokens=False)
        return [self.output_open, *body[: self.output_tokens], self.output_close], len(body) > self.output_tokens

    def _append(self, c: Completion, out: ToolOutput | None, budget: int) -> None:
        if out is None:
            out = ToolOutput("error: a call closed without being opened", "error")
        ids, cut = self.output_ids(out)
        room = budget - len(c.token_ids)
        if len(ids) >= room:  # the budget ends inside (or right after) the output: nothing follows it
            ids, c.finish_reason = ids[:room], "length"
        c.tool_calls.append(out.status + ("+truncated" if cut else ""))
        _extend(c, ids)

    def _called(self, c: Completion) -> bool:
        return c.finish_reason == "stop" and bool(c.token_ids) and c.token_ids[-1] == self.call_close

    def _open_call(self, c: Completion) -> bool:
        ids = c.token_ids
        return _last(ids, self.call_open) > _last(ids, self.call_close)


def escape(text: str, tok) -> str:
    """`text` with every string the tokenizer matches whole as one added token (its tags, EOS, ...) broken by
    a space after its first character: a program printing ``</output>`` or ``<answer>`` must not end its
    output or write the sample's answer."""
    whole = sorted((t for t in tok.get_added_vocab() if len(t) > 1), key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for t in whole:
            if t in text:
                text, changed = text.replace(t, f"{t[0]} {t[1:]}"), True
    return text


def tag_id(tok, tag: str, key: str) -> int:
    """The one id of `tag`, or a ConfigError naming `key`: a tag that is not one token cannot stop the engine."""
    ids = tok.encode(tag, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tok.unk_token_id:
        raise ConfigError(
            f"{key}={tag!r} is {len(ids)} tokens in this tokenizer ({ids[:8]}), not one: the engine stops at a "
            "single token id. Fix: add the tags to the tokenizer as tokens (tokenizer.add_tokens, saved with "
            "the model and its embedding resized), or set rollout.tool_tags to tags it has as single tokens "
            "(Qwen's chat format: [<tool_call>, </tool_call>, <tool_response>, </tool_response>])."
        )
    return ids[0]


def check_config(r) -> None:
    """The tool settings a run can start with (also checked at config time, before any model loads)."""
    TOOLS.get(r.tool)
    if r.max_tool_calls < 0 or r.tool_timeout_s <= 0 or r.tool_output_tokens < 1:
        raise ConfigError(
            f"rollout.max_tool_calls={r.max_tool_calls}, tool_timeout_s={r.tool_timeout_s}, tool_output_tokens="
            f"{r.tool_output_tokens}. Fix: max_tool_calls >= 0 (0: no tool), tool_timeout_s > 0, "
            "tool_output_tokens >= 1."
        )
    if len(r.tool_tags) != 4 or len(set(r.tool_tags)) != 4:
        raise ConfigError(
            f"rollout.tool_tags={list(r.tool_tags)}: expected four distinct tags, the call's opening and closing "
            "and the output's, e.g. [<tool>, </tool>, <output>, </output>]."
        )
    if r.max_tool_calls and r.partial:
        raise ConfigError(
            "rollout.max_tool_calls > 0 with rollout.partial=true: a partial rollout interrupts only the step's "
            "first engine call, and a tool call's continuation is another. Fix: one of the two."
        )


def _last(ids: list[int], token: int) -> int:
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] == token:
            return j
    return -1


def _begun(c: Completion) -> Completion:
    return dataclasses.replace(c, tool_mask=[0] * len(c.token_ids), tool_calls=[])


def _extend(c: Completion, ids: list[int]) -> None:
    """Appends tool tokens: masked, a placeholder log-prob, the last sampled token's weight version."""
    c.token_ids = c.token_ids + ids
    c.logprobs = c.logprobs + [0.0] * len(ids)
    c.tool_mask = c.tool_mask + [1] * len(ids)
    if c.token_versions:
        c.token_versions = c.token_versions + [c.token_versions[-1]] * len(ids)
    if c.top_ids is not None:
        k = c.top_ids.shape[1]
        c.top_ids = torch.cat([c.top_ids, torch.zeros(len(ids), k, dtype=c.top_ids.dtype)])
        c.top_logprobs = torch.cat([c.top_logprobs, torch.zeros(len(ids), k, dtype=c.top_logprobs.dtype)])


def _joined(head: Completion, tail: Completion) -> Completion:
    """A sample so far and the engine's continuation of it."""
    versions = head.token_versions + tail.token_versions if head.token_versions and tail.token_versions else []
    return Completion(
        head.token_ids + tail.token_ids,
        head.logprobs + tail.logprobs,
        tail.finish_reason,
        versions,
        *joined_tops(head, tail),
        # the continuation's prefill routed the whole prefix again: its record covers every position
        routed_experts=tail.routed_experts,
        tool_mask=head.tool_mask + [0] * len(tail.token_ids),
        tool_calls=head.tool_calls,
    )


NOT_RUN = ("unclosed", "over_limit")  # outcomes of calls the loop did not run


def tool_counts(samples) -> dict[str, int]:
    """Counts over samples (rlhf.rollout.Sample): calls run, samples that ran one, and the calls that
    failed, timed out or had their output cut; calls left open at the end, or closed past max_tool_calls."""
    outcomes = [o for s in samples for o in s.tool_calls]
    ran = [o for o in outcomes if o not in NOT_RUN]
    return {
        "calls": len(ran),
        "used": sum(any(o not in NOT_RUN for o in s.tool_calls) for s in samples),
        "errors": sum(not o.startswith("ok") for o in ran),
        "timeouts": sum(o.startswith("timeout") for o in ran),
        "truncated": sum(o.endswith("+truncated") for o in ran),
        "unclosed": outcomes.count("unclosed"),
        "over_limit": outcomes.count("over_limit"),
    }


def tool_metrics(counts: dict, samples: float) -> dict[str, float]:
    """A step's tool/ metrics from tool_counts summed over ranks."""
    n = max(samples, 1)
    return {
        "tool/calls_per_sample": counts["calls"] / n,
        "tool/use_frac": counts["used"] / n,
        **{f"tool/{k}": counts[k] for k in ("errors", "timeouts", "truncated", "unclosed", "over_limit")},
    }
