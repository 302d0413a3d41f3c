"""Property-based fuzzing (hypothesis) of the prompt-file loader: a JSONL prompt file either loads (every
math gold parses) or raises DataError naming the file and a line that really is bad; an unparsable gold is
always a load-time error. Derandomized with a fixed example budget, so each run (and CI) tries the same cases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from core.config import DataConfig
from core.data import DataError
from rlhf.prompts import load_prompts
from rlhf.tasks.math import is_parsed, parse_math
from tests.fuzz_cases import fuzz, math_text

# --- the JSONL loader -------------------------------------------------------------------------------
GOOD_GOLDS = ["42", "\\frac{1}{2}", "x^2+1", "\\{1,2\\}", "-3.5", "10 000", "\\$18.90", "\\boxed{7}"]
BAD_GOLDS = ["???", "\\frac{1}{", "", "   ", "\\", "}{", "$", "\\text{}"]
TASK_NAMES = ["math", "addition", "rg/countdown", "rg/no_such_set", "countdown", "physics", ""]
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)
row = st.fixed_dictionaries(
    {
        "prompt": st.one_of(st.text(max_size=20), st.just("What is 6*7?"), json_value),
        "answer": st.one_of(st.sampled_from(GOOD_GOLDS + BAD_GOLDS), math_text, json_value),
    },
    optional={
        "task": st.one_of(st.sampled_from(TASK_NAMES), json_value),
        "metadata": st.one_of(json_value, st.just({"entry": {"answer": "1"}})),
        "id": json_value,
    },
).map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass"))
BIG_INT_ROW = b'{"prompt": "q", "answer": ' + b"1" * 5000 + b"}"  # past int's 4300-digit str limit
good_row = st.fixed_dictionaries(  # well-formed rows; only some golds parse
    {
        "prompt": st.text(st.characters(blacklist_categories=["Cs"]), max_size=20).map(lambda t: t.strip() or "q"),
        "answer": st.one_of(
            st.sampled_from(GOOD_GOLDS), st.sampled_from(GOOD_GOLDS), math_text.map(lambda t: t or "0")
        ),
    },
    optional={"task": st.sampled_from(["math", "addition"]), "id": st.integers()},
).map(lambda r: json.dumps(r).encode())
raw_line = st.one_of(
    row,
    row,
    row,
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),  # mostly not JSON
    json_value.map(lambda v: json.dumps(v).encode()),  # JSON, not an object
    st.sampled_from(
        [
            b"",
            b"   ",
            b"\r",
            b"\xef\xbb\xbf",
            b"\xff\xfe{}",
            b"[" * 100_000,
            BIG_INT_ROW,
            b'{"prompt": "q", "answer": NaN}',
            b'{"prompt": "q", "answer": "1"',
            b'{"prompt": "q"} x',
        ]
    ),
).map(lambda b: b.replace(b"\n", b" "))


def line_is_good(raw: bytes, lineno: int) -> bool | None:
    """What loading one line should give: None blank, True a usable row, False an error (an oracle
    written from the loader's contract: core.data's schema, then validate_gold)."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        return False
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict):
        return False
    if not all(isinstance(obj.get(f), str) and obj[f].strip() for f in ("prompt", "answer")):
        return False
    task = obj.get("task") or "math"
    if not isinstance(task, str):
        return False
    if task == "math":
        return is_parsed(parse_math(obj["answer"].strip()))
    if task == "addition":
        return True
    from reasoning_gym.factory import DATASETS  # a reasoning-gym dataset, as rg/NAME or NAME

    meta = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    entry = meta.get("entry")
    return task.removeprefix("rg/") in DATASETS and isinstance(entry, dict) and "answer" in entry


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "rows.jsonl"


@fuzz(300)
@given(lines=st.one_of(st.lists(good_row, min_size=1, max_size=6), st.lists(raw_line, min_size=1, max_size=6)))
@example(lines=[b'{"prompt": "q", "answer": "1"}', b"[" * 100_000])  # was RecursionError out of json.loads
@example(lines=[BIG_INT_ROW])  # was ValueError: int digit limit
@example(lines=[b'{"prompt": "q", "answer": "1"}', b'{"prompt": "q", "answer": "\\\\frac{1}{"}'])
def test_jsonl_loads_or_names_the_bad_line(jsonl, lines):
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    verdicts = [line_is_good(raw, k) for k, raw in enumerate(lines, start=1)]
    cfg = DataConfig(name="fuzz", source="jsonl", train_path=str(jsonl), num_train=10**6, num_eval=0)
    try:
        rows = load_prompts(cfg, "train")
    except DataError as e:
        m = re.match(rf"{re.escape(str(jsonl))}(?: line (\d+))?: ", str(e))
        assert m, f"the error does not name the file: {e}"
        if m.group(1):
            assert verdicts[int(m.group(1)) - 1] is False, f"line {m.group(1)} is fine: {e}"
        else:
            assert all(v is None for v in verdicts), e  # only "no rows" is about the whole file
        assert any(v is not True for v in verdicts)
        event(f"DataError on {'a line' if m.group(1) else 'the file'}")
        return
    assert all(v is not False for v in verdicts), f"loaded, but a line is bad: {verdicts}"
    event(f"loaded {len(rows)} rows")
    good = [k for k, v in enumerate(verdicts, start=1) if v]
    assert [r["_where"] for r in rows] == [f"{jsonl} line {k}" for k in good]
    for r in rows:  # what the run will score against
        assert isinstance(r["prompt"], str) and isinstance(r["answer"], str)
        if r["task"] == "math":
            assert is_parsed(parse_math(r["answer"].strip()))
