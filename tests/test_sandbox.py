"""Code rewards in a sandbox: hostile programs end contained with reward 0, correct code scores 1, the
generated code task has valid gold, and scoring through RewardPool survives all of it."""

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from core.config import DataConfig
from core.data import DataError
from core.errors import ConfigError
from rlhf.prompts import load_prompts
from rlhf.rewards import REWARDS, RewardPool, coding, sandbox
from rlhf.tasks import code, validate_gold
from tests.conftest import skip_outside_ci

WALL = 1.5  # the tests' sandbox deadline (default 3 s): bounds every hostile case below
acc = REWARDS["accuracy"]
DIGIT_SUM = next(f for f in code.FAMILIES if f.name == "digit_sum")
SAMPLE = code.make_row(DIGIT_SUM, (("b", 10),), random.Random(0))
GOOD = "def digit_sum(n):\n    return sum(int(d) for d in str(n))\n"
SANDBOX_UIDS = range(60000, 65000)  # sandbox.sandbox_uid()'s range


@pytest.fixture(scope="module", autouse=True)
def needs_sandbox():
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as e:
        skip_outside_ci(f"no sandbox on this machine: {e}")


@pytest.fixture
def short_limits(monkeypatch):
    monkeypatch.setattr(coding, "LIMITS", sandbox.Limits(wall_s=WALL))


def answer(program: str) -> str:
    return f"I will write it.</think><answer>\n{program}\n</answer>"


def leftovers() -> list[str]:
    """Processes a sandbox left: its pid 1 and forks (the boot script is in their command line), the
    hostile programs' `sleep 31.7`, any process with a sandbox uid, any `timeout` or `unshare` below us."""
    out = []
    for p in psutil.process_iter(["pid", "uids", "name", "status", "cmdline"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.info["pid"] == os.getpid():
            continue
        if any("R1SANDBOX-READY" in a or a == "31.7" for a in p.info["cmdline"] or ()) or (
            p.info["uids"] and p.info["uids"].real in SANDBOX_UIDS
        ):
            out.append(f"{p.info['pid']} {p.info['name']}")
    for c in psutil.Process().children(recursive=True):  # the forkserver and reward workers may stay
        if c.name() in ("timeout", "unshare"):
            out.append(f"{c.pid} {c.name()} (descendant)")
    return out


def wait_clean(seconds: float = 3.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ---------------------------------------------------------------- correct and wrong code


@pytest.mark.parametrize(
    "program, want",
    [
        (GOOD, 1.0),
        (f"```python\n{GOOD}```", 1.0),  # fenced
        ("Here it is:\n```py\n    def digit_sum(n):\n        return sum(map(int, str(n)))\n```\nDone.", 1.0),
        (
            "def digit_sum(n):\n    print('debug', n)\n    return sum(map(int, str(n)))",
            1.0,
        ),  # prints don't garble results
        ("def digit_sum(n):\n    return n % 9", 0.0),  # wrong
        ("def digit_sum(n):\n    return sum(map(int, str(n))) if n else 1", 0.0),  # one edge case wrong: all or nothing
        ("def digit_sum(n):\n    return str(sum(map(int, str(n))))", 0.0),  # "7" is not 7
        ("def digit_sum(n):\n    return float(sum(map(int, str(n))))", 1.0),  # 7.0 is 7
        ("def digitsum(n):\n    return 0", 0.0),  # wrong name
        ("def digit_sum(n) return 0", 0.0),  # syntax error
        ("", 0.0),
    ],
)
def test_correct_code_scores_one_and_anything_else_zero(program, want, short_limits):
    assert acc(answer(program), SAMPLE) == want
    assert acc("no answer tags at all", SAMPLE) == 0.0


def test_judged_with_types_checked():
    assert coding.same([1, [2.0, "a"]], [1, [2, "a"]]) and coding.same({"a": None}, {"a": None})
    assert not coding.same(True, 1) and not coding.same(1, True) and not coding.same("1", 1)
    assert not coding.same([1], [1, 2]) and not coding.same({"a": 1}, {"a": 1, "b": 2}) and not coding.same(None, 0)
    tests = [{"args": [[1, 2]], "expected": [2, 1]}]
    assert coding.run_tests("def f(xs):\n    return tuple(reversed(xs))", "f", tests)[0]  # a tuple is a list


# ---------------------------------------------------------------- hostile programs

HOST_WRITES = ["/work/pwned", "/var/tmp/pwned", "/dev/shm/pwned", "/root/pwned", "/etc/pwned", "/tmp/pwned"]
FUNC = "def digit_sum(n):\n    return 0\n"  # so each case is about its attack, not about a missing function


def hostile(secret_path: str, port: int, me: int) -> dict[str, str]:
    """Name -> the program in the answer, given a secret file's path, a host port and this process's pid."""
    writes = "".join(f"    try: open({p!r}, 'w').write('x')\n    except Exception: pass\n" for p in HOST_WRITES)
    nasty_syscalls = "[libc.setuid(0), libc.unshare(0x40000000), libc.mount(None, b'/', None, 4128, None)]"
    return {
        # processes and CPU
        "fork_bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        "fork_bomb_daemons": "import os, time\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
        "            os.setsid(); time.sleep(100)\n    except OSError: pass\n" + FUNC,
        "infinite_loop": "def digit_sum(n):\n    while True: pass",
        "busy_threads": "import threading\ndef spin():\n    while True: pass\nfor _ in range(6):\n"
        "    try: threading.Thread(target=spin, daemon=True).start()\n"
        "    except RuntimeError: pass\nspin()",
        "too_many_threads": "import threading, time\nwhile True:\n"
        "    threading.Thread(target=time.sleep, args=(60,)).start()",
        "sleep_past_timeout": "import time\ntime.sleep(60)\n" + FUNC,
        "ignore_sigterm": "import signal as s, time\nfor sig in (s.SIGTERM, s.SIGINT, s.SIGHUP, s.SIGXCPU):\n"
        "    s.signal(sig, s.SIG_IGN)\nwhile True: time.sleep(0.01)",
        "recursion_bomb": "import sys\nsys.setrecursionlimit(10**9)\n"
        "def digit_sum(n):\n    return digit_sum(n + 1) + 1",
        # memory, files, descriptors
        "memory_blowup": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
        "one_huge_allocation": "x = bytearray(8 * 2**30)\n" + FUNC,
        "zip_bomb": "import zlib\nz = zlib.compress(bytes(2**24))\n"
        "keep = [zlib.decompress(z) for _ in range(200)]\n" + FUNC,
        "huge_file": "f = open('big', 'wb')\nwhile True:\n    f.write(bytes(2**20))",
        "fill_tmpfs": "i = 0\nwhile True:\n    open(f'/dev/shm/f{i}', 'wb').write(bytes(2**19)); i += 1",
        "fd_exhaustion": "import os\nfds = []\nwhile True:\n    fds.append(os.open('/dev/null', os.O_RDONLY))",
        # reading and writing the host
        "read_shadow": "import sys\ndef digit_sum(n):\n    sys.stderr.write(open('/etc/shadow').read())\n    return 0",
        "read_planted_secret": f"import sys\nsys.stderr.write(open({secret_path!r}).read())\n" + FUNC,
        "walk_the_filesystem": "import os, sys\nfor d, _, fs in os.walk('/'):\n"
        "    if d.startswith(('/usr', '/lib', '/proc')): continue\n    for f in fs:\n"
        "        try: sys.stderr.write(open(os.path.join(d, f)).read(100))\n"
        "        except Exception: pass\n" + FUNC,
        "read_host_proc": f"import sys\nsys.stderr.write(open('/proc/{me}/environ').read())\n" + FUNC,
        "read_env": "import os, sys\nsys.stderr.write(repr(dict(os.environ)))\n" + FUNC,
        "write_outside": "def digit_sum(n):\n" + writes + "    return 0",
        # network, signals, privileges, other programs
        "socket_localhost": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + FUNC,
        "socket_internet": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + FUNC,
        "kill_parent": f"import os, signal\nfor pid in (os.getppid(), {me}, 1):\n"
        "    try: os.kill(pid, signal.SIGKILL)\n    except OSError: pass\n" + FUNC,
        "killpg_and_kill_all": "import os, signal\ntry: os.killpg(os.getpgid(0), signal.SIGKILL)\n"
        "except OSError: pass\nos.kill(-1, signal.SIGKILL)",
        "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n" + FUNC,
        "ctypes_privileges": f"import ctypes, sys\nlibc = ctypes.CDLL(None)\nr = {nasty_syscalls}\n"
        "sys.stderr.write(repr(r))\nopen('/work/pwned', 'w')",
        "os_system": "import os\nos.system('echo pwned > /work/pwned; sudo touch /work/pwned; sleep 31.7')\n" + FUNC,
        "subprocess_daemon": "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 31.7 & sleep 31.7'], "
        "start_new_session=True)\ndef digit_sum(n):\n    return sum(map(int, str(n))) + 1",
        "nested_userns_remount": "import os\n"
        "os.system(\"unshare -rm sh -c 'mount -o remount,rw / && touch /work/pwned'\")\n"
        "open('/work/pwned', 'w')",
        # cheating the judge
        "sys_exit_at_import": "import sys\nsys.exit(0)",
        "os_exit_in_call": "import os\ndef digit_sum(n):\n    os._exit(0)",
        "huge_stdout": "def digit_sum(n):\n    while True: print('x' * 65536)",
        "garble_results_fd": "import os\nfor fd in range(64):\n    try: os.write(fd, b'{\"results\": []}' * 2**16)\n"
        "    except OSError: pass\n" + FUNC,
        "fake_all_passed": "import json, os\nprint('all tests passed')\n"
        'os.write(1, b\'{"results": [{"value": 1}]}\')\n'
        "json.dump = lambda *a, **k: None\n" + FUNC,
        "patch_driver_output": "import json\nreal = json.dump\n"
        "json.dump = lambda obj, f: real({'results': [{'value': 7}] * 8}, f)\n" + FUNC,
        "eq_always_true": "class Any:\n    def __eq__(self, other): return True\ndef digit_sum(n):\n    return Any()",
        "int_subclass_lies": "class Liar(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
        "def digit_sum(n):\n    return Liar(-1)",
    }


HOSTILE = sorted(hostile("", 0, 0))
assert len(HOSTILE) >= 20


@pytest.fixture(scope="module")
def attack_env():
    # World-readable, in a world-readable directory: only the sandbox's own root keeps it out of reach
    # (file permissions alone would not, even for the dedicated uid), as a dataset file would be.
    d = Path(tempfile.mkdtemp(prefix="r1-outside-", dir="/var/tmp"))
    d.chmod(0o755)
    secret = d / "hidden_tests.jsonl"
    secret.write_text("TOP-SECRET-42")
    secret.chmod(0o644)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield str(secret), listener
    listener.close()
    shutil.rmtree(d)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained_and_scores_zero(name, attack_env, short_limits, monkeypatch):
    secret, listener = attack_env
    monkeypatch.setenv("WANDB_API_KEY", "TOP-SECRET-42")  # a token in the trainer's environment
    seen = []
    run = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda *a, **k: seen.append(run(*a, **k)) or seen[-1])
    program = hostile(secret, listener.getsockname()[1], os.getpid())[name]
    start = time.monotonic()
    assert acc(answer(program), SAMPLE) == 0.0
    took = time.monotonic() - start
    assert took < WALL + 1.5, f"{name} took {took:.1f} s"
    (r,) = seen
    assert r.status != "unavailable", r.stderr[-500:]
    assert b"TOP-SECRET-42" not in r.stdout + r.stderr  # neither the planted file nor the env token leaked
    assert not [p for p in HOST_WRITES if os.path.exists(p)], "a file was written outside the sandbox"
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's loopback
    assert not wait_clean(), f"{name} left processes: {leftovers()}"


def test_statuses_of_a_raw_run():
    lim = sandbox.Limits(wall_s=WALL)
    r = sandbox.run_python("import os, sys\nprint(os.getcwd(), os.getpid(), sys.stdin.read())", "in", lim)
    assert (r.status, r.returncode, r.stdout) == ("ok", 0, b"/tmp/work 2 in\n")  # pid 2: its own pid namespace
    assert sandbox.run_python("raise SystemExit(3)", limits=lim).status == "error"
    assert sandbox.run_python("import os\nos.kill(os.getpid(), 9)", limits=lim).status == "killed"
    assert sandbox.run_python("while True: pass", limits=lim).status == "timeout"
    big = sandbox.run_python("import os\nwhile True: os.write(1, bytes(2**16))", limits=lim)
    assert big.status == "output_limit" and len(big.stdout) <= lim.output_bytes


def test_per_run_overhead():
    sandbox.run_python("pass")
    n, start = 10, time.monotonic()
    for _ in range(n):
        assert sandbox.run_python("pass").status == "ok"
    per_run_ms = (time.monotonic() - start) / n * 1000
    print(f"sandboxed run of an empty program: {per_run_ms:.0f} ms ({sandbox.sandbox_mode()} mode)")
    assert per_run_ms < 1000


def test_non_root_user_namespace_mode():
    """What a user without root gets: a user namespace, no capabilities, the same containment of writes,
    network and processes. The module is loaded from its file: a user may not read this venv."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):  # CI runs as root with setpriv: there it must run
        skip_outside_ci("simulating a user takes setpriv, as root")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("sandbox", {sandbox.__file__!r})
        sb = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sb
        spec.loader.exec_module(sb)
        progs = {{
            "caps": "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])",
            "write": "open('/var/tmp/pwned-user', 'w')",
            "read": "print(open('/etc/passwd').read())",  # world-readable on the host
            "net": "import socket; socket.create_connection(('1.1.1.1', 53), 1)",
            "remount": "import ctypes; assert ctypes.CDLL(None).mount(None, b'/', None, 4128, None) == 0",
            "bomb": "import os\\nwhile True:\\n    try: os.fork()\\n    except OSError: pass",
        }}
        runs = {{k: sb.run_python(p, limits=sb.Limits(wall_s=1.5)) for k, p in progs.items()}}
        print(json.dumps([sb.sandbox_mode(), {{k: [r.status, r.stdout.decode()] for k, r in runs.items()}}]))
    """)
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")  # one every user can run
    if python is None:
        skip_outside_ci("no system python3 for the simulated user")
    proc = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    mode, out = json.loads(proc.stdout)
    assert mode == "userns"
    assert out["caps"] == ["ok", "0000000000000000\n"]
    assert out["write"][0] == out["read"][0] == out["net"][0] == out["remount"][0] == "error"
    assert out["bomb"][0] == "timeout" and not os.path.exists("/var/tmp/pwned-user")
    assert not wait_clean()


# ---------------------------------------------------------------- fail closed, and the opt-out


def test_no_sandbox_fails_closed_at_load(monkeypatch):
    monkeypatch.setattr(sandbox, "UNSHARE", "/bin/false")  # as if unshare were refused (a container, no userns)
    sandbox.check_available.cache_clear()
    try:
        r = sandbox.run_python("print(1)")
        assert r.status == "unavailable"
        with pytest.raises(sandbox.SandboxUnavailable, match="R1STACK_SANDBOX=rlimits"):
            validate_gold([SAMPLE])
        with pytest.raises(sandbox.SandboxUnavailable):  # never run unsandboxed: the pool counts an error
            acc(answer(GOOD), SAMPLE)
    finally:
        sandbox.check_available.cache_clear()


def test_rlimits_mode_is_an_explicit_opt_in(monkeypatch):
    monkeypatch.setenv("R1STACK_SANDBOX", "rlimits")
    assert acc(answer(GOOD), SAMPLE) == 1.0
    r = sandbox.run_python("while True: pass", limits=sandbox.Limits(wall_s=WALL))
    assert r.status == "timeout" and r.wall_s < WALL + 1
    monkeypatch.setenv("R1STACK_SANDBOX", "off")
    assert sandbox.run_python("print(1)").status == "unavailable"


# ---------------------------------------------------------------- the code task


def test_every_family_reference_passes_its_hidden_tests():
    rng = random.Random(1)
    for family in code.FAMILIES:
        row = code.make_row(family, rng.choice(code.specs(family)), rng)
        meta = row["metadata"]
        assert len(meta["tests"]) == code.TESTS and meta["entry_point"] == family.name
        assert coding.run_tests(row["answer"], family.name, meta["tests"]) == (True, ""), row["answer"]
        assert acc(answer(row["answer"]), row) == 1.0


def test_code_prompts_train_and_eval_are_disjoint_and_valid():
    cfg = DataConfig(name="code", source="generated", task="code", num_train=300, num_eval=40)
    train, evals = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(train) == 300 and len(evals) == 40
    spec = lambda r: (r["metadata"]["family"], tuple(sorted(r["metadata"]["params"].items())))  # noqa: E731
    assert not {spec(r) for r in train} & {spec(r) for r in evals}
    assert len({spec(r) for r in evals}) == 40  # eval specs are distinct
    assert train[0]["prompt"].startswith("A conversation between User and Assistant")
    assert "Write a Python function" in train[0]["prompt"] and train[0]["task"] == "code"
    assert load_prompts(cfg, "eval") == evals  # deterministic
    validate_gold(train + evals)
    with pytest.raises(ConfigError, match="held-out code specs"):
        load_prompts(DataConfig(name="code", source="generated", task="code", num_eval=10**4), "eval")


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"tests": [{"args": [1], "expected": 1}]}, "entry_point"),
        ({"entry_point": "class", "tests": [{"args": [1], "expected": 1}]}, "entry_point"),
        ({"entry_point": "f", "tests": []}, "metadata.tests"),
        ({"entry_point": "f", "tests": "assert f(1) == 1"}, "metadata.tests"),
        ({"entry_point": "f", "tests": [{"args": [1], "expected": 1}, {"args": [2]}]}, r"tests\[1\]"),
        ({"entry_point": "f", "tests": [{"args": 1, "expected": 1}]}, r"tests\[0\]"),
        ({"entry_point": "f", "tests": [{"args": [1], "expected": float("nan")}]}, "JSON cannot carry"),
    ],
)
def test_malformed_hidden_tests_are_a_load_time_error_naming_the_row(tmp_path, meta, match):
    good = {
        "prompt": "write f",
        "answer": "def f(x):\n    return x",
        "task": "code",
        "metadata": {"entry_point": "f", "tests": [{"args": [1], "expected": 1}]},
    }
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "metadata": meta}) + "\n")
    cfg = DataConfig(name="j", source="jsonl", train_path=str(path), num_eval=0)
    with pytest.raises(DataError, match=rf"code.jsonl line 2: .*{match}"):
        load_prompts(cfg, "train")
    path.write_text(json.dumps(good) + "\n")
    assert acc(answer("def f(x):\n    return x"), load_prompts(cfg, "train")[0]) == 1.0


# ---------------------------------------------------------------- through the reward workers


def test_code_rewards_through_the_pool_and_the_run_goes_on():
    """Hostile completions in the forkserver workers: each scores 0, no call errors or times out, the
    workers survive; and a worker killed mid-run (pool timeout below the sandbox's) leaves nothing behind."""
    bad = hostile("/nonexistent", 9, os.getpid())
    completions = [answer(GOOD), answer("def digit_sum(n):\n    return -1")] + [
        answer(bad[k])
        for k in (
            "fork_bomb",
            "kill_parent",
            "killpg_and_kill_all",
            "sys_exit_at_import",
            "ctypes_segfault",
            "memory_blowup",
        )
    ]
    with RewardPool({"accuracy": 1.0, "format": 0.5}, timeout_s=sandbox.Limits().wall_s + 5, workers=2) as pool:
        r = pool.score(completions, [SAMPLE] * len(completions))
        assert r.per_reward["accuracy"] == [1.0] + [0.0] * (len(completions) - 1)
        assert r.errors == {"accuracy": 0, "format": 0} and r.timeouts == {"accuracy": 0, "format": 0}
        pids = [w.proc.pid for w in pool._workers]
        assert all(w.proc.is_alive() for w in pool._workers)
        assert pool.score([answer(GOOD)] * 2, [SAMPLE] * 2).per_reward["accuracy"] == [1.0, 1.0]
        assert [w.proc.pid for w in pool._workers] == pids  # the same workers: none was lost
    with RewardPool({"accuracy": 1.0}, timeout_s=0.5, workers=1) as pool:
        r = pool.score([answer("import time\ntime.sleep(60)")], [SAMPLE])
        assert r.timeouts == {"accuracy": 1} and r.total == [0.0]
        assert pool.score([answer(GOOD)], [SAMPLE]).total == [1.0]  # the replacement worker scores
    # the killed worker's sandbox: its `timeout` watchdog ends it at the sandbox deadline + 1 s
    assert not wait_clean(sandbox.Limits().wall_s + 3), leftovers()
