"""3-digit multiplication with a Python tool: the tool-integrated reasoning demo (rlhf.tool_calls).

Prompt ``User: 347*862 Assistant: <think>``. The tiny model cannot multiply in its head; with one call it
can, by copying the operands into a program and the tool's output into its answer:

    <tool>print(347*862)</tool><output>299114
    </output></think><answer>299114</answer>

The output between the output tags is the tool's, masked out of the loss in RL; in pretraining it is text
like the rest (what print writes). The pretraining mix has a minority of such traces beside answers
guessed without the tool, so the base calls the tool now and then and GRPO can make a habit of it.

The gold answer is ``str(a * b)``. 10% of the (a, b) pairs are held out by a stable hash: never in
pretraining or RL, only in evaluation.
"""

from __future__ import annotations

import hashlib
import random

from rlhf.tasks import TASKS, Task, exact_match

CALL, CALL_END, OUTPUT, OUTPUT_END = "<tool>", "</tool>", "<output>", "</output>"
THINK_END, ANSWER, ANSWER_END = "</think>", "<answer>", "</answer>"

# Shares of the pretraining mix. "guess": an answer without the tool (right in the text, but the tiny model
# cannot compute it); "tool": the full trace; "miscopied": a trace whose program miscopies an operand, so
# its output and answer are wrong (copying the question right is what RL has to select); "stopped": a call
# and its output, then nothing; "broken": a format error.
# With 10% tool traces (and 60% guesses) the 800-step base wrote the right program but then guessed its
# answer instead of copying the output (pass@1 0 with the tool, so GRPO had nothing to select); with a
# quarter it copies often enough.
MIX = {"guess": 0.45, "tool": 0.25, "miscopied": 0.05, "stopped": 0.05, "broken": 0.2}


def is_held_out(a: int, b: int) -> bool:
    return int.from_bytes(hashlib.sha256(f"{a}*{b}".encode()).digest()[:8], "big") % 10 == 0


def question(a: int, b: int) -> str:
    return f"{a}*{b}"


def make_prompt(a: int, b: int) -> str:
    """The question in the compact template (rlhf.prompts.COMPACT_TEMPLATE)."""
    return f"User: {question(a, b)} Assistant: <think>"


def call(a: int, b: int) -> str:
    """A tool call that answers the question, and its output as the python tool returns it."""
    return f"{CALL}print({a}*{b}){CALL_END}{OUTPUT}{a * b}\n{OUTPUT_END}"


def trace(a: int, b: int) -> str:
    """The completion that uses the tool right."""
    return f"{call(a, b)}{THINK_END}{ANSWER}{a * b}{ANSWER_END}"


def sample_pairs(rng: random.Random, n: int, held_out: bool = False) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if is_held_out(a, b) == held_out:
            out.append((a, b))
    return out


def _miscopy(rng: random.Random, n: int) -> int:
    digits = list(str(n))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0")])
    return int("".join(digits))


def completion(rng: random.Random, a: int, b: int, kind: str) -> str:
    """One pretraining completion of the given kind (a key of MIX)."""
    if kind == "guess":
        return f"{THINK_END}{ANSWER}{a * b}{ANSWER_END}"
    if kind == "tool":
        return trace(a, b)
    if kind == "miscopied":
        x, y = (_miscopy(rng, a), b) if rng.random() < 0.5 else (a, _miscopy(rng, b))
        return f"{call(x, y)}{THINK_END}{ANSWER}{x * y}{ANSWER_END}"
    if kind == "stopped":
        return call(a, b)
    if kind == "broken":
        return rng.choice(
            [
                f"{THINK_END}{a * b}",  # no answer tags
                f"{ANSWER}{a * b}{ANSWER_END}",  # no </think>
                f"{call(a, b)}{a * b}",  # the tool, then an untagged answer
                f"{a * b}",
            ]
        )
    raise ValueError(f"unknown completion kind {kind!r}; expected one of {list(MIX)}")


def pretraining_text(n: int, seed: int) -> list[str]:
    """n full texts (prompt + completion) over training pairs, mixed as in MIX; each fits 64 tokens."""
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=n)
    return [make_prompt(a, b) + completion(rng, a, b, k) for (a, b), k in zip(sample_pairs(rng, n), kinds)]


def prompt_rows(data_cfg, split: str, n: int) -> list[dict]:
    """RL/eval rows: training pairs for "train", distinct held-out pairs for "eval"."""
    rng = random.Random(f"{data_cfg.seed}/{split}")
    if split == "train":
        pairs = sample_pairs(rng, n)
    else:
        chosen: dict = {}
        while len(chosen) < n:
            chosen.setdefault(sample_pairs(rng, 1, held_out=True)[0])
        pairs = list(chosen)
    return [
        {"question": question(a, b), "answer": str(a * b), "task": "multiplication", "metadata": {}} for a, b in pairs
    ]


def calls_first(completion: str) -> bool:
    """The completion starts by calling the tool."""
    return completion.startswith(CALL)


TASK = TASKS.register(
    "multiplication",
    Task(
        "multiplication",
        score=exact_match,
        prompts=prompt_rows,
        template="compact",  # the tiny model's short context
        pretraining_text=pretraining_text,
        reasoning_first=calls_first,
    ),
)
