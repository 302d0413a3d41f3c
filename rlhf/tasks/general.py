"""General (non-reasoning) prompts for the tiny all-scenario stage, with preference pairs for its reward
models: greet a named person. Helpful: the summary greets that person; harmless: no insult anywhere.

    prompt   User: hi ada Assistant: <think>
    response ada</think><answer>hi ada</answer>

Names whose hash falls in the held-out tenth are kept for evaluation, as in rlhf.tasks.addition.
"""

from __future__ import annotations

import hashlib
import itertools
import random

from rlhf.tasks import TASKS, Task, exact_match

LETTERS = "abcdefghijklmnoprstuvwy"
INSULTS = ("dumb", "ugly", "lazy")
KINDS = ("helpful", "harmless")


def names(held_out: bool) -> list[str]:
    every = ["".join(t) for t in itertools.product(LETTERS, repeat=3)]
    return [n for n in every if (int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) % 10 == 0) == held_out]


def question(name: str) -> str:
    return f"hi {name}"


def prompt(name: str) -> str:
    return f"User: {question(name)} Assistant: <think>"


def good(name: str) -> str:
    return f"{name}</think><answer>hi {name}</answer>"


def unhelpful(rng: random.Random, name: str, pool: list[str]) -> str:
    other = rng.choice([n for n in rng.sample(pool, 4) if n != name])
    return rng.choice(
        [
            f"{name}</think><answer>hi {other}</answer>",
            f"{name}</think><answer>no</answer>",
            f"{name}</think><answer>bye {name}</answer>",
            f"{other}</think><answer>hi {other}</answer>",
        ]
    )


def harmful(rng: random.Random, name: str) -> str:
    bad = rng.choice(INSULTS)
    return rng.choice(
        [
            f"{name} {bad}</think><answer>hi {name}</answer>",
            f"{name}</think><answer>hi {bad} {name}</answer>",
            f"{bad}</think><answer>hi {name}</answer>",
        ]
    )


def audit(completion: str, row: dict) -> dict[str, float]:
    """What the reward models are for, per sample: `harmful` (an insult anywhere) and `ideal` (exactly the
    good response: right name in reasoning and summary, nothing else)."""
    name = row["answer"].removeprefix("hi ")
    words = completion.replace("<", " <").replace(">", "> ").split()
    return {"harmful": float(any(w in INSULTS for w in words)), "ideal": float(completion.strip() == good(name))}


def preference_pairs(kind: str, n: int, seed: int, held_out: bool = False) -> list[dict]:
    """n {prompt, chosen, rejected} rows; `kind` helpful or harmless decides what the rejected one gets wrong.
    Both kinds' chosen responses are good ones, and harmless's rejected ones stay helpful."""
    if kind not in KINDS:
        raise ValueError(f"preference kind {kind!r}: expected one of {KINDS}")
    rng, pool = random.Random(seed), names(held_out)
    rows = []
    for _ in range(n):
        name = rng.choice(pool)
        rejected = unhelpful(rng, name, pool) if kind == "helpful" else harmful(rng, name)
        rows.append({"prompt": prompt(name), "chosen": good(name), "rejected": rejected, "task": "greet"})
    return rows


def prompts(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Greeting prompts; the answer is the helpful summary's text."""
    rng, pool = random.Random(seed), names(held_out)
    if n > len(pool):
        raise ValueError(
            f"{n} greeting prompts asked, but only {len(pool)} distinct {'held-out ' if held_out else ''}names"
        )
    return [
        {"question": question(name), "prompt": prompt(name), "answer": f"hi {name}", "task": "greet"}
        for name in rng.sample(pool, n)
    ]


def sft_rows(n: int, seed: int, good_share: float = 0.6) -> list[dict]:
    """Non-reasoning SFT rows (prompt, response) of uneven quality, as real general data is: good_share good,
    the rest split between unhelpful and harmful responses. Stage 4's reward models are there to fix that."""
    rng, pool = random.Random(seed), names(False)
    rows = []
    for _ in range(n):
        name, u = rng.choice(pool), rng.random()
        response = (
            good(name)
            if u < good_share
            else unhelpful(rng, name, pool)
            if u < (1 + good_share) / 2
            else harmful(rng, name)
        )
        rows.append({"prompt": prompt(name), "response": response})
    return rows


def prompt_rows(data_cfg, split: str, n: int) -> list[dict]:
    """General RL prompts. Train rows carry no answer: no rule scores them (reward models do); held-out rows
    keep the expected summary, which the exact-match scorer checks to measure what the reward models taught."""
    held_out = split == "eval"
    return [
        {"question": r["question"], "answer": r["answer"] if held_out else None, "task": "greet", "metadata": {}}
        for r in prompts(n, data_cfg.seed + (1 if held_out else 0), held_out=held_out)
    ]


TASK = TASKS.register(
    "greet",
    Task(
        "greet",
        score=exact_match,
        prompts=prompt_rows,
        sft_rows=lambda n, seed, cfg: sft_rows(n, seed),
        audit=audit,
    ),
)
for _kind in KINDS:  # the reward models' training data: data=preference_helpful, data=preference_harmless
    TASKS.register(
        _kind,
        Task(_kind, preference_pairs=lambda n, seed, held_out, kind=_kind: preference_pairs(kind, n, seed, held_out)),
    )
