"""Generated coding tasks: write one small Python function; hidden tests decide (rlhf.rewards.coding).

A family is a parameterised spec ("the sum of the digits of n in base {b}") with a reference solution
written as source text. That text is both the row's gold ``answer`` and, executed here, the source of
the expected values, so the gold and the tests cannot disagree. Each row asks for one function, shows one
example call, and carries TESTS hidden cases (edge cases first, then seeded random inputs).

A spec (family + parameters) is held out by a stable hash (20%): evaluation asks only for functions
never asked in training.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from typing import Callable

from core.errors import ConfigError, DataError
from rlhf.rewards import coding
from rlhf.tasks import TASKS, Task

TESTS = 8
HELD_OUT_PCT = 20


def _ints(r: random.Random, lo: int = -50, hi: int = 50, n: int = 10) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(0, n))]


def _text(r: random.Random, alphabet: str = "abcdefghij XYZ.") -> str:
    return "".join(r.choice(alphabet) for _ in range(r.randint(0, 20)))


def _words(r: random.Random) -> list[str]:
    return ["".join(r.choice("abcdefgh") for _ in range(r.randint(1, 9))) for _ in range(r.randint(0, 7))]


@dataclass(frozen=True)
class Family:
    name: str  # also the function's name
    args: str  # its parameters, as written in the def
    spec: str  # what it returns, formatted with the parameters
    solution: str  # the reference body, formatted with the parameters
    grid: dict[str, tuple]  # every parameter's values
    inputs: Callable[[random.Random], list]  # one call's arguments
    edge: tuple[list, ...] = ()  # arguments always tested


FAMILIES = [
    Family(*f)
    for f in [
        (
            "digit_sum",
            "n",
            "the sum of the digits of the non-negative integer n written in base {b}",
            "total = 0\nwhile n:\n    total += n % {b}\n    n //= {b}\nreturn total",
            {"b": tuple(range(2, 17))},
            lambda r: [r.randint(0, 10**6)],
            ([0], [1]),
        ),
        (
            "count_divisible",
            "xs",
            "how many numbers in the list xs are divisible by {k}",
            "return sum(1 for x in xs if x % {k} == 0)",
            {"k": tuple(range(2, 21))},
            lambda r: [_ints(r)],
            ([[]],),
        ),
        (
            "rotate_right",
            "xs",
            "the list xs rotated right by {k} positions (the last element moves to the front, "
            "{k} times; an empty list stays empty)",
            "if not xs:\n    return []\nk = {k} % len(xs)\nreturn xs[-k:] + xs[:-k] if k else list(xs)",
            {"k": tuple(range(1, 13))},
            lambda r: [_ints(r, 0, 9)],
            ([[]], [[7]]),
        ),
        (
            "caesar",
            "s",
            "s with every lowercase letter a-z shifted {k} places forward in the alphabet, wrapping "
            "from z to a; all other characters unchanged",
            "return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
            {"k": tuple(range(1, 26))},
            lambda r: [_text(r, "abcxyz mnoPQ!")],
            ([""],),
        ),
        (
            "count_letter",
            "s",
            "how many times the letter '{c}' occurs in the string s, upper or lower case",
            "return s.lower().count('{c}')",
            {"c": tuple("abcdefghijklmnopqrstuvwxyz")},
            lambda r: [_text(r, "abcdefghijklmnopqrstuvwxyzABCDEFG ")],
            ([""],),
        ),
        (
            "long_words",
            "words",
            "the strings in the list words that are longer than {k} characters, in their order",
            "return [w for w in words if len(w) > {k}]",
            {"k": tuple(range(1, 9))},
            lambda r: [_words(r)],
            ([[]],),
        ),
        (
            "clamp_all",
            "xs",
            "the list xs with every number below {lo} replaced by {lo} and every number above {hi} replaced by {hi}",
            "return [min(max(x, {lo}), {hi}) for x in xs]",
            {"lo": tuple(range(-10, 1)), "hi": tuple(range(1, 11))},
            lambda r: [_ints(r, -20, 20)],
            ([[]],),
        ),
        (
            "every_kth",
            "xs",
            "every {k}-th element of the list xs, starting with the first (xs[0], xs[{k}], ...)",
            "return xs[::{k}]",
            {"k": tuple(range(2, 10))},
            lambda r: [_ints(r, n=20)],
            ([[]],),
        ),
        (
            "running",
            "xs",
            "the running {op} of the list xs: element i of the result is the {op} of xs[0] .. xs[i]",
            "out = []\nfor x in xs:\n    out.append(x if not out else {op}(out[-1], x))\nreturn out",
            {"op": ("max", "min")},
            lambda r: [_ints(r)],
            ([[]],),
        ),
        (
            "fib_mod",
            "n",
            "the n-th Fibonacci number modulo {m}, where F(0) = 0 and F(1) = 1",
            "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, (a + b) % {m}\nreturn a % {m}",
            {"m": tuple(range(2, 51))},
            lambda r: [r.randint(0, 300)],
            ([0], [1], [2]),
        ),
        (
            "digits_divisible",
            "n",
            "True if the sum of the decimal digits of the non-negative integer n is divisible by {k}, else False",
            "return sum(int(d) for d in str(n)) % {k} == 0",
            {"k": tuple(range(2, 13))},
            lambda r: [r.randint(0, 10**5)],
            ([0],),
        ),
        (
            "runs",
            "s",
            "a list of [character, length] pairs, in order, one for each run of a repeated character in "
            "the string s that is at least {k} long",
            "out, i = [], 0\nwhile i < len(s):\n    j = i\n    while j < len(s) and s[j] == s[i]:\n        j += 1\n"
            "    if j - i >= {k}:\n        out.append([s[i], j - i])\n    i = j\nreturn out",
            {"k": (1, 2, 3, 4)},
            lambda r: ["".join(r.choice("ab") * r.randint(1, 4) for _ in range(r.randint(0, 6)))],
            ([""],),
        ),
        (
            "nth_word",
            "s",
            "the {i}-th word of the string s (counting from 1; words are separated by single spaces), "
            "or the empty string if s has fewer than {i} words",
            "words = s.split(' ') if s else []\nreturn words[{i} - 1] if len(words) >= {i} else ''",
            {"i": tuple(range(1, 7))},
            lambda r: [" ".join(_words(r))],
            ([""],),
        ),
        (
            "poly",
            "x",
            "the value of {a}*x**2 {b:+d}*x {c:+d} for the integer x",
            "return {a} * x * x {b:+d} * x {c:+d}",
            {"a": (1, 2, 3), "b": tuple(range(-3, 4)), "c": tuple(range(-3, 4))},
            lambda r: [r.randint(-100, 100)],
            ([0],),
        ),
    ]
]


def specs(family: Family) -> list[tuple]:
    """Every parameter combination of a family, as sorted (name, value) tuples."""
    keys = sorted(family.grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(family.grid[k] for k in keys))]


def is_held_out(family: Family, params: tuple) -> bool:
    digest = hashlib.sha256(f"{family.name}:{params}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PCT


def solution(family: Family, params: tuple) -> str:
    body = family.solution.format(**dict(params)).replace("\n", "\n    ")
    return f"def {family.name}({family.args}):\n    {body}\n"


@functools.cache
def _reference(source: str, name: str) -> Callable:
    namespace: dict = {}
    exec(source, namespace)  # our own text, not model output
    return namespace[name]


def make_row(family: Family, params: tuple, rng: random.Random) -> dict:
    """One row (rlhf.prompts' form, before templating): question, gold solution, hidden tests."""
    fn = _reference(solution(family, params), family.name)
    calls = [list(a) for a in family.edge] + [family.inputs(rng) for _ in range(TESTS - len(family.edge))]
    # json round trip: tuples become lists, so the expected values are exactly what JSON carries
    tests = [{"args": a, "expected": json.loads(json.dumps(fn(*json.loads(json.dumps(a)))))} for a in calls]
    example = max((family.inputs(rng) for _ in range(3)), key=lambda a: len(repr(a)))  # not an empty list
    call = f"{family.name}({', '.join(map(repr, example))})"
    question = (
        f"Write a Python function {family.name}({family.args}) that returns "
        f"{family.spec.format(**dict(params))}. For example, {call} returns {fn(*example)!r}. "
        "Answer with the function's code only."
    )
    return {
        "question": question,
        "answer": solution(family, params),
        "task": "code",
        "metadata": {"family": family.name, "params": dict(params), "entry_point": family.name, "tests": tests},
    }


def train_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows over the training specs: a family uniformly, then one of its specs (repeats allowed)."""
    rng = random.Random(seed)
    pools = [(f, [p for p in specs(f) if not is_held_out(f, p)]) for f in FAMILIES]
    pools = [(f, ps) for f, ps in pools if ps]
    out = []
    for _ in range(n):
        family, ps = rng.choice(pools)
        out.append(make_row(family, rng.choice(ps), rng))
    return out


def eval_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows, each a different held-out spec. Raises ValueError when there are fewer than n."""
    held = [(f, p) for f in FAMILIES for p in specs(f) if is_held_out(f, p)]
    if n > len(held):
        raise ValueError(f"only {len(held)} held-out code specs, fewer than the {n} eval rows asked for")
    rng = random.Random(seed + 1)
    return [make_row(f, p, rng) for f, p in rng.sample(held, n)]


def prompt_rows(data_cfg, split: str, n: int) -> list[dict]:
    try:
        return train_rows(n, data_cfg.seed) if split == "train" else eval_rows(n, data_cfg.seed)
    except ValueError as e:
        raise ConfigError(f"data.task=code: {e}. Fix: lower data.num_eval.") from e


TASK = TASKS.register(
    "code",
    Task(
        "code",
        score=coding.score,
        # also fails at load, not mid-run, when no sandbox works here
        check_gold=lambda row, where: coding.check_code_row(row, where, DataError),
        prompts=prompt_rows,
    ),
)
