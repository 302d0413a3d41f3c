"""3-digit addition: the task of the tiny R1-Zero demo.

Prompt ``User: 385+047 Assistant: <think>``; the completion reasons column by column from the units,
each step ``x+y+carry=cd`` with a two-digit result (c = carry out, d = sum digit), then answers:

    5+7+0=12;8+4+1=13;3+0+1=04</think><answer>432</answer>

The trace always has three steps. The last step's two digits are the final carry and the hundreds
digit, so the answer is those digits read back from hundreds to units with the carry in front: 999+999
gives ``9+9+0=18;9+9+1=19;9+9+1=19`` and ``1998``. The gold answer is the sum as a plain integer
(``str(a + b)``: ``7`` for 003+004, no leading zeros), the form the trace's digits spell once leading
zeros are dropped.

10% of the (a, b) pairs are held out by a stable hash: never in pretraining or RL, only in evaluation.
"""

from __future__ import annotations

import hashlib
import random
import re

from rlhf.tasks import TASKS, Task, exact_match

THINK_END, ANSWER, ANSWER_END = "</think>", "<answer>", "</answer>"
_TRACE_START_RE = re.compile(r"\d\+\d\+\d=")
_JUNK = "0123456789+=; abcdefxyz.,!?"

# Share of each kind of pretraining text: with these, a 0.8M-parameter base writes correct traces often
# enough for GRPO to select them (held-out pass@1 0.13-0.41 before RL); a weaker mix collapses under RL.
MIX = {"bare": 0.55, "trace": 0.12, "broken": 0.25, "slip": 0.04, "truncated": 0.04}


def is_held_out(a: int, b: int) -> bool:
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10 == 0


def question(a: int, b: int) -> str:
    return f"{a:03d}+{b:03d}"


def make_prompt(a: int, b: int) -> str:
    """The question in the compact template (rlhf.prompts.COMPACT_TEMPLATE)."""
    return f"User: {question(a, b)} Assistant: <think>"


def gold(a: int, b: int) -> str:
    return str(a + b)


def _steps(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """(x, y, carry in, x+y+carry) per column, units first."""
    out, carry = [], 0
    for x, y in zip(f"{a:03d}"[::-1], f"{b:03d}"[::-1]):
        s = int(x) + int(y) + carry
        out.append((int(x), int(y), carry, s))
        carry = s // 10
    return out


def _render(steps: list[tuple[int, int, int, int]]) -> tuple[str, str]:
    """The reasoning text and the answer those steps spell (so a slipped step changes the answer)."""
    text = ";".join(f"{x}+{y}+{c}={s:02d}" for x, y, c, s in steps)
    digits = str(steps[-1][3] // 10) + "".join(str(s % 10) for *_, s in reversed(steps))
    return text, str(int(digits))


def trace(a: int, b: int) -> str:
    """The correct completion after the prompt: the steps, then the answer."""
    text, answer = _render(_steps(a, b))
    return f"{text}{THINK_END}{ANSWER}{answer}{ANSWER_END}"


def score(completion: str, gold: str) -> float:
    """1.0 iff the accuracy reward's reading of the completion is exactly `gold`: the first
    ``<answer>...</answer>``, when it opens after ``</think>`` (rlhf.rewards.rules.extract_answer)."""
    from rlhf.rewards.rules import extract_answer  # rules imports the task registry this module is part of

    return 1.0 if extract_answer(completion) == gold else 0.0


def starts_with_trace(completion: str) -> bool:
    """Reasoning first: the completion opens with a column step like ``5+7+0=``."""
    return _TRACE_START_RE.match(completion) is not None


def sample_pairs(rng: random.Random, n: int, held_out: bool = False) -> list[tuple[int, int]]:
    """n uniform pairs from the training split (or from the held-out split)."""
    out = []
    while len(out) < n:
        a, b = rng.randrange(1000), rng.randrange(1000)
        if is_held_out(a, b) == held_out:
            out.append((a, b))
    return out


def _junk(rng: random.Random) -> str:
    # At most 3 characters: the longest text (a 4-digit answer plus junk) then fits 64 tokens.
    return "".join(rng.choice(_JUNK) for _ in range(rng.randint(1, 3)))


def _slip(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    steps = _steps(a, b)
    i = rng.randrange(3)
    x, y, c, s = steps[i]
    steps[i] = (x, y, c, (s // 10) * 10 + (s % 10 + rng.choice((1, 9))) % 10)  # one sum digit off by ±1
    return _render(steps)


def _broken(rng: random.Random, a: int, b: int) -> str:
    """A format error; most still reason first, as an unfinished R1-style habit would.

    The content stays right: random answers after a correct trace taught the base to ignore its own
    steps (teacher-forced accuracy of the answer digits read back from the trace: 5% with 30% of broken
    texts answering at random, 96% without, both after 600 steps).
    """
    text, answer = _render(_steps(a, b))
    variants = [
        f"{text}{THINK_END}{answer}",  # answer without tags
        f"{text}{ANSWER}{answer}{ANSWER_END}",  # no </think>
        f"{text}{THINK_END}{ANSWER}{answer}{ANSWER_END}{_junk(rng)}",  # junk after the answer
        f"{text}{THINK_END}{ANSWER}{answer}",  # unclosed answer
        f"{text}",  # reasoning, never an answer
        f"{answer}",  # bare number, no tags at all
        f"{THINK_END}{answer}{_junk(rng)}",
    ]
    return rng.choices(variants, weights=[3, 3, 3, 2, 1, 2, 1])[0]


def completion(rng: random.Random, a: int, b: int, kind: str) -> str:
    """One pretraining completion of the given kind (a key of MIX)."""
    if kind == "bare":
        return f"{THINK_END}{ANSWER}{gold(a, b)}{ANSWER_END}"
    if kind == "trace":
        return trace(a, b)
    if kind == "slip":
        text, answer = _slip(rng, a, b)
        return f"{text}{THINK_END}{ANSWER}{answer}{ANSWER_END}"
    if kind == "truncated":  # cut anywhere before the end, keeping tags whole
        text, answer = _render(_steps(a, b))
        units = [*text, THINK_END, ANSWER, *answer]
        return "".join(units[: rng.randrange(1, len(units))])
    if kind == "broken":
        return _broken(rng, a, b)
    raise ValueError(f"unknown completion kind {kind!r}; expected one of {list(MIX)}")


def pretraining_text(rng: random.Random, n: int) -> list[str]:
    """n full texts (prompt + completion) over training pairs, mixed as in MIX."""
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=n)
    return [make_prompt(a, b) + completion(rng, a, b, k) for (a, b), k in zip(sample_pairs(rng, n), kinds)]


def eval_prompts(n: int, seed: int = 0) -> list[dict]:
    """n distinct held-out problems as rows with ``prompt`` and ``answer`` (core.data's "prompt" kind)."""
    rng, chosen = random.Random(seed), {}
    while len(chosen) < n:
        chosen.setdefault(sample_pairs(rng, 1, held_out=True)[0])
    return [{"prompt": make_prompt(a, b), "question": question(a, b), "answer": gold(a, b)} for a, b in chosen]


def train_prompts(n: int, seed: int = 0) -> list[dict]:
    """n problems from the training split (for RL), same row form as eval_prompts."""
    pairs = sample_pairs(random.Random(seed), n)
    return [{"prompt": make_prompt(a, b), "question": question(a, b), "answer": gold(a, b)} for a, b in pairs]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """n supervised rows from the training split: the prompt and a correct, readable trace (cold-start style)."""
    pairs = sample_pairs(random.Random(seed), n)
    return [{"prompt": make_prompt(a, b), "response": trace(a, b)} for a, b in pairs]


def prompt_rows(data_cfg, split: str, n: int) -> list[dict]:
    """RL/eval rows: train pairs for "train", distinct held-out pairs for "eval"."""
    make = train_prompts if split == "train" else eval_prompts
    return [
        {"question": r["question"], "answer": r["answer"], "task": "addition", "metadata": {}}
        for r in make(n, seed=data_cfg.seed)
    ]


def _final_eval(cfg, policy, tok) -> dict:
    from rlhf.tasks.addition_eval import final_eval  # torch: only where a model is evaluated

    return final_eval(cfg, policy, tok)


TASK = TASKS.register(
    "addition",
    Task(
        "addition",
        score=exact_match,  # the exact match of score() above, so RL rewards and the pretraining eval agree
        prompts=prompt_rows,
        template="compact",  # the tiny model has a 64-token context
        pretraining_text=lambda n, seed: pretraining_text(random.Random(seed), n),
        sft_rows=lambda n, seed, cfg: sft_rows(n, seed),
        final_eval=_final_eval,
        reasoning_first=starts_with_trace,
    ),
)
