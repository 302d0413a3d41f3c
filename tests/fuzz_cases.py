"""Hypothesis settings and text strategies shared by the fuzzing tests (test_fuzz, test_fuzz_loader)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


LATEX = [
    "\\frac{1}{2}",
    "\\frac{",
    "{",
    "}",
    "\\boxed{",
    "$",
    "\\$",
    "\\(",
    "\\)",
    "\\[",
    "\\]",
    "\\sqrt{2}",
    "x^2",
    "^",
    "_",
    "=",
    ",",
    " or ",
    "\\{1,2\\}",
    "\\infty",
    "\\pi",
    "\\text{",
    "\\,",
    "~",
    "\\\\",
    "&",
    "%",
    "\\%",
    "\\begin{pmatrix}",
    "\\end{pmatrix}",
    "\\left(",
    "\\right)",
    "\\lor",
    "\\pm",
    "(",
    ")",
    "[",
    "]",
]
NASTY = [
    "\x00",
    "\ufeff",
    "\u202e",
    "\ud800",
    "\U0001d7d9",
    "١٢٣",
    "²",
    "１２",
    "ｅｘｉｔ()",
    "exit()",
    "quit()",
    "__import__('os').getpid()",
    "[1, 2]",
    "'a'",
    "\n",
    "\r\n",
    "\t",
    " ",
    "NaN",
    "inf",
    "1e309",
    "-0",
    "0.",
    "...",
]
numbers = st.one_of(st.integers(-(10**6), 10**6).map(str), st.floats(allow_nan=False, width=32).map(str))
math_text = st.lists(st.one_of(st.sampled_from(LATEX + NASTY), st.text(max_size=5), numbers), max_size=10).map("".join)
