"""Running untrusted Python (a policy's completion) and judging it so that it cannot cheat.

    runner.run_script(code, stdin, limits) -> {"returncode", "stdout", "timed_out", "output_capped"}
    runner.run_tests(code, ["assert f(1) == 2", ...], limits) -> [True, False, ...]
    runner.run_tests(code, [TestCase(test, entry_points=("f",), setup=prompt)], limits)

Isolation (`Limits.isolation`):
  "namespaces": Linux user, mount, pid, network, ipc and uts namespaces (see launcher): no
      network at all, a root of its own that holds none of the host's files (read-only /usr and
      Python, one size-limited tmpfs to write in), a pid namespace whose end kills every descendant,
      no_new_privs and a seccomp filter; plus kernel limits (CPU seconds, address space, file size,
      open files, processes as the unprivileged user) and, as a second layer, a Python audit hook.
      The threat model: THREAT_MODEL.md beside this file.
  "python": the kernel limits and the audit hook only, in a session of its own (macOS, containers
      that forbid user namespaces). Python code can defeat an audit hook, so this is weaker: see
      `FALLBACK_WARNING`.
  "auto" (default): namespaces where `namespaces_available()`, else "python" with a one-time warning.

Every run gets a fresh folder, removed at the end; a run that outlives `timeout_s` (wall clock) is
killed with everything it started. stdin is a file, so a program that never reads it cannot block
the runner.

Why the verdict of `run_tests` cannot be forged: the tests never run in the solution's process.
The sandbox (server) only runs the solution and answers calls to its functions with plain
data; the test code runs here, in the runner, calling those functions through a pipe and evaluating
the asserts on the decoded values. Nothing the solution can print, exit with, read (its files, argv,
environment, memory) or install (atexit, excepthook, patched builtins) can make an assert that runs in
another process succeed: its only influence is the values its functions return, which is what is
being tested. Values cross as plain data (exact types: no subclasses, no objects), so a result whose
`__eq__` is always True cannot arrive. The tests' source and expected values never enter the
sandbox, so they cannot be read there either.
The test's namespace holds only what the dataset declares (`TestCase`): the runner's own builtins,
the helpers of the dataset's `setup` source (HumanEval's prompt), and the entry points, each bound to
calls into the sandbox. A solution that defines `abs`, `range` or the prompt's `encode_cyclic`
changes nothing the test computes. Only the exceptions a test may expect (`RERAISED`) come back as
themselves; any other (StopIteration, which would end a test's loop over `map(candidate, ...)`, or
SystemExit) is a `SolutionError`.
Not covered: a solution that hard-codes answers it can guess or derive from the arguments it is called
with; tests that need objects other than plain data, or that check in-place mutation of arguments
(arguments are copies) fail; the test code itself is trusted (it comes with the dataset and runs in
the runner's process, under the verifier pool's timeout).
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import symtable
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Sequence

from grpo_jax.rewards.sandbox import server

ISOLATIONS = ("auto", "namespaces", "python")
_LAUNCHER = open(os.path.join(os.path.dirname(__file__), "launcher.py"), encoding="utf-8").read()
_SERVER = open(server.__file__, encoding="utf-8").read()
UNAVAILABLE = 125  # the launcher's exit status when a namespace step fails

FALLBACK_WARNING = (
    "grpo_jax.rewards.sandbox.runner: Linux namespaces are unavailable ({reason}); untrusted code runs with kernel "
    "limits and a Python audit hook only. NOT isolated: the network (loopback and the host's network "
    "are reachable by code that disables the hook), the filesystem outside the run's folder (writable "
    "wherever the sandbox user may write), and processes that leave the process group (they can "
    "outlive the run).")


@dataclasses.dataclass(frozen=True)
class Limits:
    """timeout_s: wall clock per run (also the CPU-time limit, rounded up); memory_mb: address space;
    max_output: bytes of stdout read; max_procs: processes of the sandbox user; disk_mb and max_files:
    the working folder's size and number of files (with namespaces; without, only a 16 MiB limit per
    file holds); isolation: see module."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output: int = 1 << 20
    max_procs: int = 32
    disk_mb: int = 32
    max_files: int = 1024
    isolation: str = "auto"

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation {self.isolation!r}: expected one of {ISOLATIONS}")


# --------------------------------------------------------------------------------------------------
# Identity and isolation


def _world_executable(path: str) -> bool:
    """Whether any user may run `path`: o+x on the file and on every folder above it."""
    path = os.path.realpath(path)
    try:
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
            if path == os.path.dirname(path):
                return True
            path = os.path.dirname(path)
    except OSError:
        return False


# As root, the sandboxes of each process run as a uid of their own from this range (no account has
# one): RLIMIT_NPROC counts processes per uid machine-wide, so one program's fork bomb cannot make
# the sandboxes of another verifier worker fail to start, as it did when they all ran as `nobody`.
SANDBOX_UIDS = (0x7FFF0000, 0x10000)  # (first, how many)


@functools.cache
def _interpreter() -> str | None:
    """As root: an interpreter any uid may execute (ours if it can, else the system python3)."""
    for exe in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if exe and _world_executable(exe):
            return os.path.realpath(exe)
    return None


def _identity() -> tuple[int, int, str]:
    """(uid, gid, interpreter). As root the code runs as this process's sandbox uid (so that
    RLIMIT_NPROC and file permissions apply) with an interpreter that uid may execute; otherwise as
    ourselves (-1, -1) with our interpreter (the real binary: the sandbox's root holds its prefix,
    not a venv's links)."""
    exe = _interpreter() if os.geteuid() == 0 else None
    if exe is None:
        return -1, -1, os.path.realpath(sys.executable)
    uid = SANDBOX_UIDS[0] + os.getpid() % SANDBOX_UIDS[1]
    return uid, uid, exe


@functools.cache
def namespaces_available() -> tuple[bool, str]:
    """(True, "") when a sandbox with namespaces starts here, else (False, why). Probed once per
    process by running a one-line program in one."""
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    r = _run("print('ok')", "", Limits(timeout_s=20.0), namespaces=True)
    if r["returncode"] == 0 and r["stdout"].strip() == "ok":
        return True, ""
    return False, (r["stdout"].strip()[:200] or f"probe exited with {r['returncode']}")


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(FALLBACK_WARNING.format(reason=reason), RuntimeWarning, stacklevel=3)


def _use_namespaces(isolation: str) -> bool:
    if isolation == "python":
        return False
    ok, reason = namespaces_available()
    if not ok and isolation == "namespaces":
        raise RuntimeError(f"sandbox isolation 'namespaces' requested but unavailable: {reason}")
    if not ok:
        _warn_fallback(reason)
    return ok


# --------------------------------------------------------------------------------------------------
# Starting and stopping one sandbox


@dataclasses.dataclass
class _Sandbox:
    proc: subprocess.Popen
    workdir: str
    namespaces: bool

    def stop(self) -> None:
        """Kill everything the run started and remove its folder. With namespaces the launcher kills
        the pid namespace and waits until it is empty; without, the session's process group is
        killed."""
        if self.proc.poll() is None and self.namespaces:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start(code: str, mode: str, stdin: str, limits: Limits, namespaces: bool, stdout,
           pass_fds: Sequence[int] = ()) -> _Sandbox:
    uid, gid, python = _identity()
    workdir = tempfile.mkdtemp(prefix="grpo_code_")
    try:
        for name, text in (("main.py", code), ("stdin", stdin)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8", errors="replace") as fh:
                fh.write(text)
        if uid >= 0:
            for path in (workdir, os.path.join(workdir, "main.py")):
                os.chown(path, uid, gid)
        # RLIMIT_NPROC counts every task of the real user: as the sandbox uid that is the sandbox's alone; as
        # ourselves it includes this process's threads (JAX starts dozens), so the budget goes on top.
        nproc = limits.max_procs if uid >= 0 else _tasks_of(os.getuid()) + limits.max_procs
        cfg = {"parent": os.getpid(), "workdir": workdir, "cpu_s": max(1, int(math.ceil(limits.timeout_s))),
               "memory": limits.memory_mb << 20, "fsize": min(16, limits.disk_mb) << 20, "nproc": nproc,
               "disk": limits.disk_mb << 20, "files": limits.max_files, "uid": uid, "gid": gid,
               "namespaces": namespaces, "python": python, "server": _SERVER, "server_args": [mode, *map(str, pass_fds)]}
        # The launcher applies the limits and then execs: no preexec_fn, so subprocess can use
        # vfork/posix_spawn instead of forking a multithreaded (JAX) parent.
        with open(os.path.join(workdir, "stdin"), "rb") as stdin_fh:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], cwd=workdir, env={"PATH": "/usr/bin:/bin"},
                stdin=stdin_fh, stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True,
                close_fds=True, pass_fds=tuple(pass_fds))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return _Sandbox(proc, workdir, namespaces)


def _tasks_of(uid: int) -> int:
    """Threads of all processes whose real user is `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        if int(status.get("Uid", "-1").split()[0]) == uid:
            total += int(status.get("Threads", "1"))
    return total


def _read_capped(pipe, out: bytearray, cap: int) -> None:
    while len(out) < cap:
        chunk = pipe.read1(65536)
        if not chunk:
            return
        out.extend(chunk)


def _run(code: str, stdin: str, limits: Limits, namespaces: bool) -> dict[str, Any]:
    box = _start(code, "script", stdin, limits, namespaces, subprocess.PIPE)
    out, timed_out = bytearray(), False
    reader = threading.Thread(target=_read_capped, args=(box.proc.stdout, out, limits.max_output), daemon=True)
    reader.start()
    start = time.monotonic()
    try:
        reader.join(limits.timeout_s)
        capped = len(out) >= limits.max_output
        if reader.is_alive():
            timed_out = True
        elif not capped:  # output closed: wait for the exit in the time left
            try:
                box.proc.wait(timeout=max(0.05, limits.timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        box.stop()
        reader.join(1.0)
        box.proc.stdout.close()
    returncode = box.proc.returncode
    timed_out = timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)  # the CPU limit hit
    return {"returncode": returncode, "stdout": bytes(out[:limits.max_output]).decode("utf-8", "replace"),
            "timed_out": timed_out, "output_capped": capped}


def run_script(code: str, stdin: str = "", limits: Limits = Limits()) -> dict[str, Any]:
    """Run `code` as a program with `stdin`; returns {"returncode", "stdout", "timed_out",
    "output_capped"} (at most limits.max_output bytes of stdout are read; stderr is discarded)."""
    return _run(code, stdin, limits, _use_namespaces(limits.isolation))


# --------------------------------------------------------------------------------------------------
# Assert tests against a solution served from the sandbox


class SandboxFailure(Exception):
    """The sandbox died, timed out, or broke the protocol: the test fails."""


class SolutionError(Exception):
    """The solution's function raised an exception that is not in `RERAISED`."""


# The exceptions a solution's function raises into the test as themselves: those a test may expect
# (`try: f(-1) except ValueError`, `pytest.raises(KeyError)`). Not StopIteration/StopAsyncIteration
# (they end the test's own iteration: `for y in map(f, xs): assert ...` would pass vacuously), not
# GeneratorExit, SystemExit or KeyboardInterrupt, not AssertionError (an assert the test did not write).
RERAISED = {e.__name__: e for e in (
    ValueError, UnicodeError, TypeError, LookupError, IndexError, KeyError, ArithmeticError, ZeroDivisionError,
    OverflowError, FloatingPointError, AttributeError, NameError, RuntimeError, NotImplementedError,
    RecursionError, MemoryError, OSError, FileNotFoundError, EOFError)}


@dataclasses.dataclass(frozen=True)
class TestCase:
    """Trusted test source and what its namespace may hold.

    test: Python source (asserts, `def check(candidate): ...` then `check(f)`), run in the runner.
    entry_points: the solution's names bound into the test (functions as calls into the sandbox, plain
        values as values). None: the names the test reads without defining them (`free_names`).
    setup: trusted source run first in the test's namespace, e.g. HumanEval's prompt with its helper
        functions (`poly`, `encode_cyclic`) and imports; its definitions of the entry points are
        replaced by the solution's.
    """

    __test__ = False  # not a pytest class
    test: str
    entry_points: tuple[str, ...] | None = None
    setup: str = ""

    @classmethod
    def of(cls, test: "str | dict | TestCase") -> "TestCase":
        """From source, or a dataset's {"test", "entry_point" (a name or a list), "setup"} row."""
        if isinstance(test, TestCase):
            return test
        if isinstance(test, str):
            return cls(test)
        if not isinstance(test, dict) or not isinstance(test.get("test"), str):
            raise TypeError(f"a test case is source or a dict with a 'test' source; got {str(test)[:80]!r}")
        entry = test.get("entry_point", test.get("entry_points"))
        if entry is not None:
            entry = (entry,) if isinstance(entry, str) else tuple(str(e) for e in entry)
        return cls(test["test"], entry, str(test.get("setup") or ""))

    def __post_init__(self):
        if self.setup and self.entry_points is None:  # the setup's signatures would hide the solution's
            raise ValueError("a test case with `setup` must name its `entry_point`(s)")

    def names(self) -> tuple[str, ...]:
        if self.entry_points is not None:
            return self.entry_points
        return tuple(sorted(free_names(self.test)))


def _defined(source: str) -> set[str]:
    """Names a module's top level assigns, defines or imports."""
    if not source:
        return set()
    table = symtable.symtable(source, "<setup>", "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def free_names(source: str) -> set[str]:
    """Names `source` reads at module scope (directly or from its functions) that it never defines
    there and that are not builtins: the names a test expects the solution to provide."""
    table = symtable.symtable(source, "<test>", "exec")
    read, defined = set(), _defined(source)

    def walk(t, top):
        for s in t.get_symbols():
            if s.is_referenced() and (top or s.is_global()):
                read.add(s.get_name())
            if not top and s.is_global() and s.is_assigned():  # `global x; x = ...`
                defined.add(s.get_name())
        for child in t.get_children():
            walk(child, False)

    walk(table, True)
    return read - defined - set(dir(builtins))



class _Channel:
    """The runner's end of the call pipes, with one deadline for the whole test."""

    def __init__(self, requests: int, responses: int, deadline: float, max_bytes: int):
        self.requests, self.responses, self.deadline, self.max_bytes = requests, responses, deadline, max_bytes
        self.failed: str | None = None

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.responses], [], [], left)[0]:
                raise SandboxFailure("timed out")
            chunk = os.read(self.responses, n - len(buf))
            if not chunk:
                raise SandboxFailure("the solution's process ended")
            buf += chunk
        return buf

    def receive(self):
        try:
            size = int.from_bytes(self._read(8), "little")
            if size > self.max_bytes:
                raise SandboxFailure(f"a {size}-byte message is over the {self.max_bytes}-byte limit")
            return json.loads(self._read(size))
        except SandboxFailure as e:
            self.failed = str(e)
            raise
        except (ValueError, RecursionError) as e:
            self.failed = f"unreadable message: {e}"
            raise SandboxFailure(self.failed) from None

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.failed:
            raise SandboxFailure(self.failed)
        try:
            server.write_message(self.requests, [name, server.encode(args),
                                                         server.encode(kwargs)])
        except (BrokenPipeError, OSError) as e:
            self.failed = f"the solution's process ended ({e})"
            raise SandboxFailure(self.failed) from None
        response = self.receive()
        if type(response) is list and len(response) == 2 and response[0] == "ok":
            try:
                return server.decode(response[1])
            except (TypeError, ValueError, RecursionError) as e:  # e.g. an unhashable dict key
                self.failed = f"undecodable result: {e}"
                raise SandboxFailure(self.failed) from None
        if type(response) is list and len(response) == 3 and response[0] == "raise":
            kind = RERAISED.get(str(response[1]))
            if kind is not None:
                raise kind(str(response[2]))
            raise SolutionError(f"{response[1]}: {response[2]}")
        self.failed = "bad response"
        raise SandboxFailure(self.failed)

    def stub(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)
        call.__name__ = call.__qualname__ = name
        return call


def _run_test(code: str, case: TestCase, limits: Limits, namespaces: bool) -> bool:
    requests_r, requests_w = os.pipe()
    responses_r, responses_w = os.pipe()
    try:
        box = _start(code, "serve", "", limits, namespaces, subprocess.DEVNULL, pass_fds=(requests_r, responses_w))
    finally:
        os.close(requests_r)
        os.close(responses_w)
    channel = _Channel(requests_w, responses_r, time.monotonic() + limits.timeout_s, limits.max_output)
    try:
        ready = channel.receive()
        if not (type(ready) is list and len(ready) == 3 and ready[0] == "ready" and type(ready[1]) is list
                and type(ready[2]) is dict):
            return False
        functions, values = set(map(str, ready[1])), {str(k): v for k, v in ready[2].items()}
        namespace: dict[str, Any] = {"__name__": "__test__", "__builtins__": builtins}
        if case.setup:
            exec(compile(case.setup, "<setup>", "exec"), namespace)  # noqa: S102 - the dataset's, trusted
        for name in case.names():  # only these of the solution's names: never its `abs` or `poly`
            if name in functions:
                namespace[name] = channel.stub(name)
            elif name in values:
                namespace[name] = server.decode(values[name])
            else:
                namespace.pop(name, None)  # the setup's empty signature must not stand in for it
        exec(compile(case.test, "<test>", "exec"), namespace)  # noqa: S102 - the dataset's test, trusted
        return channel.failed is None  # a timeout that the test swallowed is still a failure
    except Exception:  # noqa: BLE001 - a failed assert, an error of the solution, a dead sandbox
        return False
    finally:
        os.close(requests_w)
        os.close(responses_r)
        box.stop()


def run_tests(code: str, tests: Sequence[str | dict | TestCase], limits: Limits = Limits()) -> list[bool]:
    """Whether the solution `code` passes each test (source, a `TestCase`, or a dataset's
    {"test", "entry_point", "setup"} dict), each in a fresh sandbox with `limits.timeout_s` for the
    solution's start and the test's calls together.

    The test runs here and calls the solution's entry points (functions, or plain-data constants) by
    name; see the module docstring for why its verdict cannot be forged.
    """
    cases = [TestCase.of(t) for t in tests]  # malformed cases fail here, before any sandbox starts
    for case in cases:
        for source, what in ((case.setup, "setup"), (case.test, "test")):
            try:
                compile(source, f"<{what}>", "exec")
            except SyntaxError as e:
                raise ValueError(f"the dataset's test {what} does not compile: {e}") from None
    namespaces = _use_namespaces(limits.isolation)
    return [_run_test(code, case, limits, namespaces) for case in cases]
