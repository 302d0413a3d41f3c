"""The ``code`` task's scorer (rlhf.tasks.code registers it): the function in ``<answer>`` runs on the row's hidden tests in the sandbox.

A code row: ``metadata.entry_point`` (the function's name) and ``metadata.tests``, a list of
``{"args": [...], "expected": value}`` in plain JSON values; ``answer`` is a reference solution (for
people and SFT; scoring never runs it). The answer may wrap the code in a ```python fence.

All or nothing, like R1's accuracy: 1.0 iff every test's return value equals the expected one. Partial
credit would pay for solutions that special-case the easy inputs.

Judged here, not in the sandbox: the sandbox gets the code and the test inputs, never the expected values,
and sends back each return value as JSON. So printing "all tests passed", patching the driver, exiting
early or returning an object whose ``__eq__`` always says True cannot pass: only plain JSON values (exact
types, no subclasses) equal to the expected ones count, and a missing result fails.
"""

from __future__ import annotations

import json
import keyword
import math
import re
import textwrap

from rlhf.rewards import sandbox

LIMITS = sandbox.Limits()  # per completion, all its tests in one run
MAX_TESTS = 1000
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)

# Runs inside the sandbox: reads {"code", "entry_point", "inputs"} on stdin, writes {"results": [...]}
# on the original stdout; the tested code's own prints go to stderr, so they cannot garble the results.
DRIVER = r"""
import json, os, sys
req = json.loads(sys.stdin.read())
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

def plain(v, depth=0):
    t = type(v)
    if depth > 100:
        raise ValueError("nested too deep")
    if v is None or t in (bool, int, float, str):
        return v
    if t in (list, tuple):
        return [plain(x, depth + 1) for x in v]
    if t is dict and all(type(k) is str for k in v):
        return {k: plain(x, depth + 1) for k, x in v.items()}
    raise TypeError(f"returned a {t.__name__}, not a JSON value")

ns = {"__name__": "solution"}
exec(compile(req["code"], "<solution>", "exec"), ns)
fn = ns[req["entry_point"]]
results = []
for args in req["inputs"]:
    try:
        results.append({"value": plain(fn(*args))})
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: that test fails, the others run
        results.append({"error": type(e).__name__})
json.dump({"results": results}, out)
out.flush()
"""


def extract_code(answer: str) -> str:
    """The first fenced block's code if there is one, else the whole answer; dedented."""
    m = _FENCE_RE.search(answer)
    return textwrap.dedent(m.group(1) if m else answer).strip("\n")


def same(got, want) -> bool:
    """JSON values equal with types checked: True is not 1, "1" is not 1; numbers within 1e-9."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if type(want) in (int, float):
        if type(got) not in (int, float):
            return False
        if type(got) is int and type(want) is int:
            return got == want
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    if type(want) is list:
        return type(got) is list and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if type(want) is dict:
        return type(got) is dict and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want  # str, None


def run_tests(code: str, entry_point: str, tests: list[dict], limits: sandbox.Limits | None = None) -> tuple[bool, str]:
    """(every test passed, why not), under ``limits`` (default: LIMITS). Raises SandboxUnavailable when
    the sandbox cannot start at all."""
    if not code.strip():
        return False, "no code"
    request = json.dumps({"code": code, "entry_point": entry_point, "inputs": [t["args"] for t in tests]})
    r = sandbox.run_python(DRIVER, request, limits or LIMITS)
    if r.status == "unavailable":
        raise sandbox.SandboxUnavailable(r.stderr.decode(errors="replace").strip()[-600:])
    if r.status != "ok":
        return False, f"{r.status} (exit {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}"
    try:
        results = json.loads(r.stdout)["results"]
    except Exception:  # noqa: BLE001  (anything unreadable is a failed run)
        results = None
    if type(results) is not list or len(results) != len(tests):
        return False, f"unreadable results {r.stdout[:200]!r}"
    for i, (res, test) in enumerate(zip(results, tests)):
        if type(res) is not dict or "value" not in res or not same(res["value"], test["expected"]):
            return False, f"test {i}: args {test['args']!r:.100} gave {res!r:.100}, expected {test['expected']!r:.100}"
    return True, ""


def score(answer: str, sample: dict) -> float:
    meta = sample["metadata"]
    return 1.0 if run_tests(extract_code(answer), meta["entry_point"], meta["tests"])[0] else 0.0


def check_code_row(row: dict, loc: str, error: type[Exception]) -> None:
    """Raises ``error`` naming the row unless its hidden tests are usable; then checks, once per process,
    that the sandbox works here (SandboxUnavailable says why and how to fix it)."""
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    entry, tests = meta.get("entry_point"), meta.get("tests")
    fix = (
        "Fix: give the row metadata.entry_point (a function name) and metadata.tests, a list of "
        '{"args": [...], "expected": value} with JSON values'
    )
    if not isinstance(entry, str) or not entry.isidentifier() or keyword.iskeyword(entry):
        raise error(f"{loc}: task 'code' needs metadata.entry_point, a function name; got {entry!r:.80}. {fix}")
    if not isinstance(tests, list) or not 0 < len(tests) <= MAX_TESTS:
        raise error(
            f"{loc}: task 'code' needs metadata.tests, a list of 1 to {MAX_TESTS} tests; got "
            f"{type(tests).__name__} {tests!r:.80}. {fix}"
        )
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or set(t) != {"args", "expected"} or not isinstance(t["args"], list):
            raise error(f"{loc}: metadata.tests[{i}] = {t!r:.80} is not {{'args': [...], 'expected': value}}. {fix}")
        try:
            ok = same(json.loads(json.dumps(t, allow_nan=False)), t)
        except (TypeError, ValueError, RecursionError):
            ok = False
        if not ok:
            raise error(
                f"{loc}: metadata.tests[{i}] = {t!r:.80} holds a value JSON cannot carry exactly (a tuple, "
                f"set, object, NaN or non-string dict key). {fix}"
            )
    sandbox.check_available()
