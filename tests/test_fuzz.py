"""Property-based fuzzing (hypothesis) of answer extraction, the rule rewards and the math-verify wrapper
(the prompt-file loader's: test_fuzz_loader.py). Every test is derandomized with a fixed example budget, so
each run (and CI) tries the same cases.

* The rewards never raise on any text (unicode, null bytes, lone surrogates, unbalanced or nested tags,
  huge repeats, Python that a scorer might run) and score exactly 0 or 1.
* No garbage scores 1: text without the gold's digits, wrong numbers in any hedging shape ("1, 2",
  "1 or 2", "\\boxed{1}\\boxed{2}", several <answer> blocks, the gold only in <think>), and one answer never
  matches two different golds. Only the first <answer> block counts.
* The math-verify wrapper never raises on any gold or prediction, and through the RewardPool a batch of
  answers that hang it (or sympy, or a scorer's eval) costs at most the pool's timeout per call.
"""

from __future__ import annotations

import builtins
import functools
import math
import re
import time

import pytest
from hypothesis import assume, event, example, given
from hypothesis import strategies as st

from rlhf.rewards import REWARDS, RewardPool, extract_answer
from rlhf.rewards.rules import ANSWER, ANSWER_END, THINK, THINK_END
from rlhf.tasks import gym
from rlhf.tasks import math as math_task
from rlhf.tasks.math import is_parsed, parse_math
from tests.fuzz_cases import LATEX, NASTY, fuzz, math_text, numbers

TAGS = [THINK, THINK_END, ANSWER, ANSWER_END]

fmt, acc, gated = REWARDS["format"], REWARDS["accuracy"], REWARDS["format_gated_accuracy"]


def math_sample(gold: str) -> dict:
    return {"prompt": "p", "answer": gold, "task": "math", "metadata": {}}


@functools.cache
def sample(name: str) -> dict:
    """A fixed prompt row per task."""
    if name == "addition":
        return {"prompt": "p", "answer": "432", "task": "addition", "metadata": {}}
    if name.startswith("math:"):
        return math_sample(name.removeprefix("math:"))
    import reasoning_gym

    entry = reasoning_gym.create_dataset(name.removeprefix("rg/"), size=1, seed=3)[0]
    return {"prompt": "p", "answer": str(entry["answer"]), "task": name, "metadata": {"entry": entry}}


# Golds no digit-free text can reach (e^{i\pi} = -1 and \frac{x}{x} = 1 are digit-free, so none are small).
FAR_GOLDS = ["math:1234", "math:-58", "math:\\frac{7}{13}", "math:0.375", "math:10^{6}"]
MATH_GOLDS = FAR_GOLDS + ["math:x^2+1", "math:\\{1,2\\}", "math:\\sqrt{2}", "math:10 000", "math:\\$18.90"]
# countdown, string_insertion and n_queens hand the answer to Python: gym._RG_PARSE_EXPR, gym._RG_EVAL.
RG = ["rg/countdown", "rg/basic_arithmetic", "rg/gsm_symbolic", "rg/string_insertion", "rg/n_queens"]
ALL = ["addition", *MATH_GOLDS, *RG]

PARTIAL_TAGS = ["<answer", "answer>", "</answer", "<think", "</think", "<", ">", "/", "</", "<<answer>>"]
piece = st.one_of(st.sampled_from(TAGS + PARTIAL_TAGS + LATEX + NASTY), st.text(max_size=8), numbers)
# Huge repeats of flat text; nesting repeats ("(" * 60) are slow by design (math-verify times out at 5 s)
# and go through the pool in test_pool_never_waits_past_its_timeout.
huge = st.tuples(
    st.sampled_from(TAGS + PARTIAL_TAGS + ["a", "1", " ", "\x00", "é", "1, ", "\\,"]), st.integers(100, 5000)
).map(lambda t: t[0] * t[1])
small_text = st.lists(piece, max_size=14).map("".join)
text = st.lists(st.integers(0, 9).flatmap(lambda i: huge if i == 0 else piece), max_size=14).map("".join)
# Two in three hold an <answer> block, so the scorers see most of them.
completions = st.one_of(
    text,
    st.tuples(text, text, text).map(lambda t: f"{t[0]}{ANSWER}{t[1]}{ANSWER_END}{t[2]}"),
    st.tuples(text, text).map(lambda t: f"{t[0]}{ANSWER}{t[1]}{ANSWER_END}"),
)


def tame(text: str, task: str) -> str:
    # countdown's scorer runs sympy on the answer: "9**9**9**9" or "999999!" hangs in C, where only the
    # pool's kill stops it (test_pool_never_waits_past_its_timeout), not a test that calls it inline.
    return text.replace("**", "*").replace("!", "") if task == "rg/countdown" else text


def answer_block(text: str) -> str:
    return f"r{THINK_END}{ANSWER}{text}{ANSWER_END}"


@fuzz(400)
@given(c=completions, name=st.sampled_from(ALL))
@example(c=answer_block("exit()"), name="rg/string_insertion")  # was: SystemExit out of accuracy (eval)
@example(c=answer_block("quit()"), name="rg/n_queens")
@example(c=answer_block("ｅｘｉｔ()"), name="rg/countdown")  # Python reads fullwidth names as ASCII
@example(c=ANSWER * 3000 + "x" + ANSWER_END * 2, name="math:1234")
def test_rewards_never_raise_and_score_0_or_1(c, name):
    c, s = tame(c, name), sample(name)
    f, a, g = fmt(c, s), acc(c, s), gated(c, s)
    assert f in (0.0, 1.0) and a in (0.0, 1.0) and g == f * a
    answer = extract_answer(c)
    if f:  # one of each tag, in order, both filled
        assert all((THINK + c).count(t) == 1 for t in TAGS) and answer is not None and answer.strip()
    if answer is None:
        assert a == 0.0
    event(f"{name.partition(':')[0]}: {'no answer block' if answer is None else f'scored, accuracy {a}'}")


_FIRST_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)  # what extract_answer was: quadratic, same result
tag_soup = st.lists(st.sampled_from(TAGS + PARTIAL_TAGS + ["a", " ", "\n", "2", "</answer>\n"]), max_size=30).map(
    "".join
)


@fuzz(300)
@given(tag_soup)
def test_extract_answer_is_the_first_complete_block_after_the_reasoning(c):
    end, m = c.find(THINK_END), _FIRST_BLOCK.search(c)
    assert extract_answer(c) == (m.group(1) if m and end >= 0 and m.start() > end else None)


def test_extract_answer_is_linear():
    # The regex took 11 s on 16k unclosed <answer> tags (128k characters, a 32k-token degenerate response),
    # and rlhf.evaluate calls it in the trainer's process; 400k characters take a millisecond now.
    start = time.perf_counter()
    assert extract_answer(THINK_END + ANSWER * 50_000) is None
    assert extract_answer(THINK_END + ANSWER * 50_000 + "1" + ANSWER_END) == ANSWER * 49_999 + "1"
    assert time.perf_counter() - start < 2.0


no_answer_open = text.filter(lambda t: ANSWER not in t)


@fuzz(100)
@given(
    head=no_answer_open,
    answer=small_text,
    tail=completions,
    name=st.sampled_from(["addition", "math:1234", "math:-58", "rg/gsm_symbolic"]),
)
@example(head="", answer="</think>", tail="", name="addition")  # was: a block straddling </think> let a later one count
def test_only_the_first_answer_block_counts(head, answer, tail, name):
    s = sample(name)
    while ANSWER_END in answer:
        answer = answer.replace(ANSWER_END, "")
    for first in (answer, s["answer"]):
        c = f"{head}{ANSWER}{first}{ANSWER_END}"
        assert acc(c + tail, s) == acc(c, s)
        assert acc(c + f"{ANSWER}{s['answer']}{ANSWER_END}", s) == acc(c, s)  # the gold again, later


def digit_free(text: str) -> str:
    return "".join(ch for ch in text if not ch.isnumeric())  # ASCII, fullwidth, Arabic-Indic digits, ², ½...


@fuzz(250)
@given(
    before=text,
    inside=small_text,
    after=text,
    name=st.sampled_from([*FAR_GOLDS, "addition", "rg/countdown", "rg/basic_arithmetic", "rg/gsm_symbolic"]),
)
def test_text_without_digits_never_scores(before, inside, after, name):
    s = sample(name)
    c = tame(digit_free(before + ANSWER + inside + ANSWER_END + after), name)
    assert acc(c, s) == 0.0 and gated(c, s) == 0.0


# Ways to give several numbers in one answer. Left out, because LaTeX reads them as arithmetic, not as a
# list: "/", "\cdot", "|a|", "!", and a wide space (\quad, \text{ }, "$ $" in a box), which latex2sympy
# reads as a mixed number (12 \quad 34 = 46). Each of those reads as one value, so it cannot hedge either.
SEPS = [
    ", ",
    ",",
    " , ",
    " or ",
    " and ",
    "; ",
    " \\text{ or } ",
    " \\text{or} ",
    " \\lor ",
    " \\vee ",
    " = ",
    " \\neq ",
    " \\approx ",
    " \\to ",
    " \\\\ ",
    " & ",
    "$ or $",
    "} or \\boxed{",
    "}, \\boxed{",
    ANSWER_END + ANSWER,
    ANSWER_END + " or " + ANSWER,
    " ",
    "  ",
    "\\,",
    "~",
    "\\ ",
    "\n",
    "\\;",
]
WRAPS = [
    "{}",
    "${}$",
    "\\boxed{{{}}}",
    "x = {}",
    "x \\in \\{{{}\\}}",
    "\\{{{}\\}}",
    "[{}]",
    "({})",
    "\\({}\\)",
    "\\[{}\\]",
    "The answer is {}",
    "{} or something",
    "{}.",
    "\\text{{{}}}",
]


def hedge(nums: list[int], sep: str, wrap: str) -> str:
    return answer_block(wrap.format(sep.join(map(str, nums))))


@fuzz(400)
@given(
    gold=st.integers(100, 99_999).flatmap(lambda g: st.sampled_from([g, -g])),
    nums=st.lists(st.integers(0, 99_999), min_size=1, max_size=5),
    sep=st.sampled_from(SEPS),
    wrap=st.sampled_from(WRAPS),
    think=st.booleans(),
)
@example(gold=17, nums=[12, 5], sep=" ", wrap="{}", think=False)  # was 1: "12 5" read as the mixed number 12 + 5
@example(gold=46, nums=[12, 34], sep=" ", wrap="\\boxed{{{}}}", think=False)
def test_wrong_numbers_never_score_in_any_hedge(gold, nums, sep, wrap, think):
    # Wrong: no number is the gold, and the gold's digits do not appear even across the numbers
    # ("12 34" is 1234, as LaTeX typesets it).
    assume(gold not in nums and str(abs(gold)) not in "".join(map(str, nums)))
    c = hedge(nums, sep, wrap)
    if think:  # the gold in the reasoning, not in the answer
        c = f"so it is {gold}, i.e. \\boxed{{{gold}}} " + c
    assert acc(c, math_sample(str(gold))) == 0.0


@fuzz(250)
@given(
    nums=st.lists(st.integers(-20, 20), min_size=2, max_size=5, unique=True),
    sep=st.sampled_from(SEPS),
    wrap=st.sampled_from(WRAPS),
)
def test_one_answer_never_matches_two_golds(nums, sep, wrap):
    # A policy cannot list candidates and be paid for whichever is right: at most one of them scores.
    c = hedge(nums, sep, wrap)
    assert sum(acc(c, math_sample(str(n))) for n in nums) <= 1


@pytest.mark.parametrize(
    "gold, pred, want",
    [
        ("10000", "10 000", 1.0),  # was 0, and "0" was right: math-verify reads "10 000" as 10·0
        ("0", "10 000", 0.0),
        ("1000", "1\\,000", 1.0),
        ("1000000", "1~000~000", 1.0),
        ("10 000", "10000", 1.0),  # the same gold, which loaded as 0
        ("0", "7 0", 0.0),
        ("17", "12 5", 0.0),  # was 1: the mixed-number rule, 12 + 5
        ("3/2", "1 \\frac12", 1.0),  # mixed numbers still read as such
        ("\\$18.90", "18.9", 1.0),  # was a load-time error: \$ was taken for a math delimiter
        ("18.90", "\\$18.90", 1.0),
    ],
)
def test_math_reads_digit_groups_as_latex_does(gold, pred, want):
    assert is_parsed(parse_math(gold))
    assert acc(answer_block(pred), math_sample(gold)) == want


@fuzz(300)
@given(gold=math_text, pred=math_text)
@example(gold="10 000", pred="0")
@example(gold="1\\!000", pred="\\$1,000")
def test_math_verify_wrapper_never_raises(gold, pred):
    parsed = parse_math(gold.strip())
    assert isinstance(parsed, list)
    if is_parsed(parsed):  # a gold that loads: scoring any prediction gives 0 or 1
        assert math_task.score(pred, math_sample(gold)) in (0.0, 1.0)
        assert math_task.score("", math_sample(gold)) == 0.0
    event(f"gold {'parses' if is_parsed(parsed) else 'rejected at load'}")


def test_rg_scorers_never_run_the_answer():
    # Was: reasoning-gym's countdown scorer ran the answer through sympy.parse_expr (an eval), so
    # "setattr(__import__('numpy'), 'isclose', 'x'.format) or <the numbers>" scored 1 with a wrong value,
    # and so did every later answer in that worker; string_insertion, n_queens, ... eval() it outright.
    flag = "_r1stack_fuzz_ran"
    payload = f"setattr(__import__('builtins'), '{flag}', 1)"
    for name in [
        "rg/countdown",
        "rg/puzzle24",
        "rg/simple_integration",
        "rg/polynomial_multiplication",
        "rg/string_insertion",
        "rg/spiral_matrix",
        "rg/binary_matrix",
        "rg/n_queens",
    ]:
        s = sample(name)
        for answer in (payload, f"{payload} or 1", f"[{payload}]", "exit()", "ｅｘｉｔ()", "[x for x in ()]"):
            assert acc(answer_block(answer), s) == 0.0
            assert not hasattr(builtins, flag), f"{name} ran {answer!r}"
        assert acc(answer_block(s["answer"]), s) == 1.0, name  # the right answer still scores


def test_rg_eval_lists_are_complete_and_their_golds_pass():
    # Every reasoning-gym scorer that calls eval or parse_expr is guarded (fails when an upgrade adds one),
    # and the guard lets every generated gold through.
    import ast
    import inspect
    import textwrap

    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    runs_answer = set()
    for name, (cls, _) in DATASETS.items():
        src = inspect.getsource(cls.score_answer)
        calls = {
            n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(ast.parse(textwrap.dedent(src)))
            if isinstance(n, ast.Call)
        }
        if calls & {"eval", "exec", "parse_expr", "sympify"}:
            runs_answer.add(name)
    runs_answer.discard("number_sorting")  # evals its own gold, never the answer
    assert runs_answer == gym._RG_EVAL | gym._RG_PARSE_EXPR
    for name in gym._RG_PARSE_EXPR:
        ds = reasoning_gym.create_dataset(name, size=20, seed=11)
        assert all(gym._plain_math(str(ds[i]["answer"])) for i in range(len(ds))), name


@pytest.fixture(scope="module")
def pool():
    with RewardPool({"accuracy": 1.0, "format": 0.5}, timeout_s=3.0, workers=2) as p:
        yield p


@fuzz(6)
@given(batch=st.lists(st.tuples(completions, st.sampled_from(ALL)), min_size=6, max_size=6))
def test_pool_scores_as_inline(pool, batch):
    comps = [tame(c, name) for c, name in batch]
    samples = [sample(name) for _, name in batch]
    out = pool.score(comps, samples)
    for i, (c, s) in enumerate(zip(comps, samples)):
        assert out.per_reward["format"][i] == fmt(c, s)
        if not out.timeouts["accuracy"]:
            assert out.per_reward["accuracy"][i] == acc(c, s)
    assert not any(out.errors.values())


def test_pool_never_waits_past_its_timeout(pool):
    batch = [
        (answer_block("exit()"), "rg/string_insertion"),  # was SystemExit in the worker
        (ANSWER * 100_000, "math:1234"),  # was quadratic
        (answer_block("9^{9^{9^9}}"), "math:1234"),  # sympy: math-verify's own limit is 5 s
        (answer_block("(" * 60 + "1" + ")" * 60), "math:1234"),  # the LaTeX parser: 5 s, twice
        (answer_block("9**9**9**9"), "rg/countdown"),  # a C-level bignum in sympy: only a kill stops it
        (answer_block("1234"), "math:1234"),
        (answer_block("x"), "math:1234"),
    ]
    comps, samples = [c for c, _ in batch], [sample(n) for _, n in batch]
    pool.score(comps[:2] + comps[-2:], samples[:2] + samples[-2:])  # workers up and importing before the clock
    start = time.monotonic()
    out = pool.score(comps, samples)
    elapsed = time.monotonic() - start
    # Each call costs at most the timeout: 3 hangs (more if a fresh worker's first import is slow on a loaded
    # machine) on 2 workers, plus forking their replacements; the 5 s limits inside math-verify never count.
    timeouts = out.timeouts["accuracy"]
    assert timeouts >= 3 and elapsed < pool.timeout_s * timeouts + 15, (timeouts, elapsed)
    assert not any(out.errors.values()) and not out.timeouts["format"]
    assert out.per_reward["accuracy"] == [0, 0, 0, 0, 0, 1, 0]
    assert all(math.isfinite(t) and 0 <= t <= 1.5 for t in out.total)
