"""One-digit addition reasoned in words, in English or Spanish: the setup where R1's language-consistency
reward has something to fix. The base's corpus switches language between the two clauses of the reasoning
as often as not, and a third of its sums are wrong:

    User: 3+4 Assistant: <think>three plus four, son siete</think><answer>7</answer>

The accuracy reward alone teaches the sums and leaves the mixing; adding language_consistency (target
English) makes the reasoning English. There are only 100 questions, so evaluation reuses them: what it
measures is how the model reasons, not what it has memorised.
"""

from __future__ import annotations

import random

from rlhf.tasks import TASKS, Task, exact_match

WORDS = {
    "en": "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciseis "
    "diecisiete dieciocho".split(),
}
PLUS, MAKES = {"en": "plus", "es": "mas"}, {"en": "makes", "es": "son"}
# (first clause, second clause) languages in the corpus: mixed half the time
LANGUAGES = {("en", "en"): 0.3, ("es", "es"): 0.2, ("en", "es"): 0.25, ("es", "en"): 0.25}
WRONG_SHARE = 1 / 3


def prompt(a: int, b: int) -> str:
    return f"User: {a}+{b} Assistant: <think>"


def response(a: int, b: int, total: int, first: str, second: str) -> str:
    w1, w2 = WORDS[first], WORDS[second]
    return f"{w1[a]} {PLUS[first]} {w1[b]}, {MAKES[second]} {w2[total]}</think><answer>{total}</answer>"


def pretraining_text(rng: random.Random, n: int) -> list[str]:
    pairs, weights = list(LANGUAGES), list(LANGUAGES.values())
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        total = a + b if rng.random() >= WRONG_SHARE else rng.choice([s for s in range(19) if s != a + b])
        out.append(prompt(a, b) + response(a, b, total, *rng.choices(pairs, weights)[0]))
    return out


def prompts(n: int, seed: int) -> list[dict]:
    """n RL/eval rows (core.data's prompt fields, question untemplated), drawn from the 100 questions."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"question": f"{a}+{b}", "answer": str(a + b), "task": "bilingual", "metadata": {}})
    return rows


TASK = TASKS.register(
    "bilingual",
    Task(
        "bilingual",
        score=exact_match,
        prompts=lambda data_cfg, split, n: prompts(n, data_cfg.seed + (0 if split == "train" else 1)),
        template="compact",  # the corpus's own prompt form
        pretraining_text=lambda n, seed: pretraining_text(random.Random(seed), n),
    ),
)
