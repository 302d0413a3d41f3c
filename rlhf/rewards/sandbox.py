"""Run untrusted Python (model-written code) in a throwaway sandbox: ``run_python(program, stdin, limits)``.

What contains a run (Linux; root is not needed, and nothing runs unsandboxed unless asked to):

* Namespaces, from util-linux ``unshare``: network (only a downed loopback: no network, not even the
  host's 127.0.0.1), pid (the program sees only its own processes, and when the sandbox's first process
  ends the kernel kills every process left in it, so no fork bomb or daemonised child outlives a run),
  IPC, and mount: the program's root is a fresh size-capped tmpfs holding only /usr, /bin, /lib*, the
  interpreter's prefix and /etc/ld.so.cache (read-only), five /dev nodes and its own /proc. No other host
  file (datasets with hidden tests, sources, homes, /etc/shadow) can be read or written; /tmp/work (its
  working directory), /tmp and /dev/shm are writable and vanish with the run.
* Who it runs as. As root: a dedicated uid with no groups (``sandbox_uid``: 60000 + pid % 5000, so each
  reward worker has its own and RLIMIT_NPROC, which counts per uid, caps that run alone). Not root: a
  user namespace maps the user to root inside, and the program runs with every capability dropped.
* no_new_privs (setuid binaries such as sudo gain nothing), rlimits (CPU seconds, address space, file
  size, processes, open files, no core files), an environment of four variables (none of the trainer's
  tokens), a wall-clock deadline after which the whole process group is killed, capped output, and
  coreutils ``timeout`` as a watchdog that ends the sandbox even when its caller is killed mid-run (a
  reward worker replaced by RewardPool).

When the namespaces cannot be made (unprivileged user namespaces disabled, a container without
CAP_SYS_ADMIN) every run fails closed with status "unavailable"; ``check_available`` says why at load
time. ``R1STACK_SANDBOX=rlimits`` opts in to running without namespaces (rlimits, a private temp dir and
the deadline only: the program can then read and write what the user can and use the network), for
trusted code or a throwaway VM. The set-up runs in the sandbox's own interpreter (``_BOOT``) and uses
ctypes for mount(2) and capset(2), which Python 3.11's os module lacks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

UNSHARE, TIMEOUT = "unshare", "timeout"  # util-linux, coreutils
READY = b"R1SANDBOX-READY\n"  # written after set-up, before the program: without it the sandbox never started
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # for unshare/timeout; the program gets its own


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start on this machine: no run can be trusted, so none is scored."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 3.0  # the whole run, start-up included (~15-50 ms of it); keep reward.timeout_s above it
    cpu_s: int = 2  # per process: SIGXCPU, then SIGKILL a second later
    memory_bytes: int = 256 * 2**20  # address space per process (RLIMIT_AS)
    file_bytes: int = 2**20  # largest file it may write (RLIMIT_FSIZE)
    disk_bytes: int = 8 * 2**20  # the sandbox's tmpfs root (/tmp/work, /tmp, /dev/shm)
    processes: int = 8  # processes and threads of its uid (RLIMIT_NPROC; not for root in rlimits mode)
    open_files: int = 64
    output_bytes: int = 2**20  # stdout past this kills the run; stderr past it is dropped


@dataclass
class Result:
    status: str  # ok | error (exit != 0) | killed (by a signal) | timeout | output_limit | unavailable
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float


def sandbox_mode() -> str:
    """root (dedicated uid), userns (not root: user namespace) or rlimits (R1STACK_SANDBOX=rlimits)."""
    asked = os.environ.get("R1STACK_SANDBOX", "auto")
    if asked not in ("auto", "rlimits"):
        raise SandboxUnavailable(f"R1STACK_SANDBOX={asked!r}: expected auto (namespaces) or rlimits (no namespaces)")
    if asked == "rlimits":
        return "rlimits"
    return "root" if os.geteuid() == 0 else "userns"


def sandbox_uid() -> int:
    # Unique among live reward workers (pids differ), inside the 16-bit range that containers map.
    return 60000 + os.getpid() % 5000


def sandbox_python() -> str:
    """The interpreter the sandbox runs: R1STACK_SANDBOX_PYTHON, else this one's base interpreter (not the
    venv: the program gets the standard library only). Its prefix is bound into the sandbox's root, so it
    need not be readable by the sandbox's uid on the host (a pyenv under /root works)."""
    return os.environ.get("R1STACK_SANDBOX_PYTHON") or getattr(sys, "_base_executable", None) or sys.executable


def run_python(program: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Runs ``program`` as ``__main__`` in a fresh sandbox with ``stdin`` as its standard input."""
    start = time.monotonic()
    try:
        mode = sandbox_mode()
    except SandboxUnavailable as e:
        return Result("unavailable", None, b"", str(e).encode(), 0.0)
    workdir = tempfile.mkdtemp(prefix="r1sandbox-") if mode == "rlimits" else "/tmp/work"
    request = {
        "program": program,
        "stdin": stdin,
        "mode": mode,
        "uid": sandbox_uid(),
        "workdir": workdir,
        "limits": dataclasses.asdict(limits),
    }
    ns = [UNSHARE, "--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child"]
    cmd = [
        TIMEOUT,
        "-s",
        "KILL",
        f"{limits.wall_s + 1:.1f}",  # the watchdog that outlives a killed caller
        *({"root": ns, "userns": [*ns, "--map-root-user"]}.get(mode, [])),
        sandbox_python(),
        "-I",
        "-S",
        "-B",
        "-c",
        _BOOT,
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_ENV,
            cwd="/",
            start_new_session=True,
        )
    except OSError as e:  # no unshare or timeout binary
        return Result("unavailable", None, b"", f"cannot start the sandbox: {e}".encode(), 0.0)
    deadline, cut = start + limits.wall_s, "timeout"
    try:
        out, err, cut = _communicate(proc, json.dumps(request).encode(), deadline, limits.output_bytes)
        if not cut:  # its output closed: the namespace is gone or going; allow the exit up to the deadline
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        cut = "timeout"
    finally:
        if cut:
            os.killpg(proc.pid, signal.SIGKILL)  # timeout and unshare; unshare's death kills the namespace
        proc.wait()
        if mode == "rlimits":
            shutil.rmtree(workdir, ignore_errors=True)
    rc, ready = proc.returncode, out.startswith(READY)
    if cut:
        status = cut
    elif not ready:
        status = "unavailable"  # unshare or the set-up failed: stderr says why
    else:
        status = "ok" if rc == 0 else "killed" if rc > 128 or rc < 0 else "error"
    return Result(status, rc, out[len(READY) :] if ready else out, err, time.monotonic() - start)


def _communicate(proc, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Feeds stdin and reads stdout/stderr until both close or the deadline passes; keeps at most ``cap``
    bytes of each, and stops at once when stdout goes past it (what a run returns is small). Returns
    (stdout, stderr, None | "timeout" | "output_limit")."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        view = memoryview(data)
        while len(sel.get_map()):
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), "timeout"
            for key, _ in sel.select(left):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        view = view[os.write(f.fileno(), view[:65536]) :]
                    except BrokenPipeError:  # the sandbox never read it (it failed to start)
                        view = view[:0]
                    if not view:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 65536)
                if not chunk:
                    sel.unregister(f)
                    continue
                buf = bufs[f]
                if f is proc.stdout and len(buf) + len(chunk) > cap + len(READY):
                    return bytes(buf), bytes(bufs[proc.stderr]), "output_limit"
                buf += chunk[: max(0, cap - len(buf))]
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), None


@functools.cache
def check_available() -> None:
    """Raises SandboxUnavailable, with the reason and the fix, unless a sandboxed run works here. Cached."""
    r = run_python("print('ok')", limits=Limits(wall_s=30.0))  # generous: only a busy machine is slow here
    if r.status != "ok" or r.stdout != b"ok\n":
        why = r.stderr.decode(errors="replace").strip()[-600:] or f"status {r.status}, stdout {r.stdout[:200]!r}"
        raise SandboxUnavailable(
            f"cannot run code in a sandbox (mode {sandbox_mode()}): {why}. Fix: allow unshare (root: "
            "CAP_SYS_ADMIN, e.g. docker --cap-add SYS_ADMIN --security-opt seccomp=unconfined; not root: "
            "sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0), or accept running "
            "model code without isolation with R1STACK_SANDBOX=rlimits"
        )


# The sandbox's first process (pid 1 of its namespace): reads the request on stdin, makes the mounts,
# then forks the program's process, which drops privileges and sets limits before running the program.
# pid 1 stays behind only to reap; when the program's process ends, pid 1 exits with its status and the
# kernel kills anything the program left running.
_BOOT = r"""
import ctypes, io, json, os, resource, sys
req = json.loads(sys.stdin.buffer.read())
mode, lim, uid, work = req["mode"], req["limits"], req["uid"], req["workdir"]
libc = ctypes.CDLL(None, use_errno=True)

def ok(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE = 1, 2, 4, 8, 32, 4096, 8192
NEW = "/tmp"  # the new root: a fresh tmpfs, mounted here, filled, then moved onto /

def bind(path, readonly=True):
    dst = NEW + path
    if os.path.isdir(path):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    ok(libc.mount(os.fsencode(path), os.fsencode(dst), None, BIND, None), f"bind {path}")
    if readonly:  # a user namespace may add read-only, never drop the source's nosuid/nodev/atime flags
        f = os.statvfs(dst).f_flag
        keep = (f & (NOSUID | NODEV | NOEXEC | 1024 | 2048)) | (1 << 21 if f & 4096 else 0)  # ST_RELATIME
        ok(libc.mount(None, os.fsencode(dst), None, REMOUNT | BIND | RDONLY | keep, None), f"read-only {path}")

if mode != "rlimits":
    os.setsid()  # out of the caller's process group: kill(0, ...) reaches nothing outside
    # A root holding only the system's programs and libraries and this interpreter, read-only, so no
    # other file of the host (datasets with the hidden tests, sources, homes, /etc) can be read or written.
    size = f"size={lim['disk_bytes']},nr_inodes=4096,mode=755".encode()
    ok(libc.mount(b"tmpfs", NEW.encode(), b"tmpfs", NOSUID | NODEV, size), "tmpfs for the new root")
    bound = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(top), NEW + top)
        elif os.path.isdir(top):
            bind(top); bound.append(top + "/")
    for prefix in sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}):
        if not any((prefix + "/").startswith(b) for b in bound):
            bind(prefix); bound.append(prefix + "/")
    if os.path.exists("/etc/ld.so.cache"):  # where the loader finds libraries (libz, libffi) for extensions
        bind("/etc/ld.so.cache")
    for dev in ("null", "zero", "full", "random", "urandom"):
        bind("/dev/" + dev, readonly=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{NEW}/dev/{name}")
    os.makedirs(NEW + "/proc")
    ok(libc.mount(b"proc", f"{NEW}/proc".encode(), b"proc", NOSUID | NODEV | NOEXEC, None), "proc")
    for d in ("/tmp", "/dev/shm"):
        os.makedirs(NEW + d, exist_ok=True)
        os.chmod(NEW + d, 0o1777)
    os.chdir(NEW)
    ok(libc.mount(b".", b"/", None, MOVE, None), "move the new root onto /")
    os.chroot(".")
    os.chdir("/")
    os.mkdir(work, 0o700)
    if mode == "root":
        os.chown(work, uid, uid)
    child = os.fork()
    if child:
        while True:
            pid, status = os.wait()
            if pid == child:
                os._exit(min(255, 128 + os.WTERMSIG(status)) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    if mode == "root":
        os.setgroups([]); os.setgid(uid); os.setuid(uid)  # from root to another uid: every capability goes
    else:  # userns: still root inside, with all capabilities there; drop them all, for exec'd programs too
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly past the last capability
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        ok(libc.capset(header, data), "capset (drop capabilities)")
ok(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
R = resource
limits = [(R.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1), (R.RLIMIT_AS, lim["memory_bytes"], None),
          (R.RLIMIT_FSIZE, lim["file_bytes"], None), (R.RLIMIT_NOFILE, lim["open_files"], None),
          (R.RLIMIT_CORE, 0, None),
          (R.RLIMIT_NPROC, lim["processes"], None)]  # counted per uid, per user namespace since Linux 5.14
for res, soft, hard in limits:
    R.setrlimit(res, (soft, soft if hard is None else hard))
os.chdir(work)
os.umask(0o077)
os.environ.clear()
os.environ.update(PATH="/usr/bin:/bin", HOME=work, TMPDIR=work, LANG="C.UTF-8")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.stdin = io.StringIO(req["stdin"])
sys.argv = ["-"]
program = req.pop("program")
del req, libc, ctypes
os.write(1, b"R1SANDBOX-READY\n")
code = 0
try:
    exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
except BaseException:
    import traceback  # ~10 ms to import: only when needed

    traceback.print_exc()
    code = 1
try:
    sys.stdout.flush(); sys.stderr.flush()
finally:
    os._exit(code & 255)
"""
