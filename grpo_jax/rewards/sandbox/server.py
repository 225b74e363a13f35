"""The program that runs inside the sandbox: it runs the untrusted solution and, for assert tests,
serves calls to the solution's functions. Standard library only, and no grpo_jax import: the
interpreter that runs it (as `python -I -S -c <this file's text>`) may not see the package.

    script mode: the solution runs as __main__ (stdin from a file, stdout read by the runner).
    serve mode:  the solution runs as a module; then this loop answers
                 request  = [name, args, kwargs]          (encoded plain data)
                 response = ["ok", value] | ["raise", exception type name, message]
                 as length-prefixed JSON on two pipes. The tests themselves run in the runner's
                 process (`grpo_jax.rewards.sandbox.runner.run_tests`), never here, so nothing the solution does
                 in this process can make a test pass: see that function's docstring.

The solution's source is compiled on its own, so `from __future__` imports at its top work.

`encode`/`decode` (shared with the runner) carry plain data only: None, bool, int, float, complex,
str, bytes and lists, tuples, dicts, sets and frozensets of them, checked by exact type. An object
of any other type (a class whose `__eq__` is always True, an int subclass) is refused, so it cannot
reach the runner's comparisons.
"""

import json
import os
import sys

MAX_DEPTH = 64
SCALARS = (type(None), bool, int, float, str)  # exact types: JSON carries these as they are


COLLECTIONS = {"t": tuple, "s": set, "f": frozenset}  # tag -> type, for sequences of items


def encode(x, depth=0):
    """Plain data as a JSON tree; containers other than lists become one-key tagged dicts."""
    t = type(x)
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if t in SCALARS:
        return x
    if t is list:
        return [encode(v, depth + 1) for v in x]
    for tag, kind in COLLECTIONS.items():
        if t is kind:
            return {tag: [encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"b": x.decode("latin-1")}
    if t is complex:
        return {"c": [x.real, x.imag]}
    raise TypeError(f"a {t.__module__}.{t.__qualname__} is not plain data")


def decode(x, depth=0):
    """Inverse of `encode`; anything else raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if type(x) in SCALARS:
        return x
    if type(x) is list:
        return [decode(v, depth + 1) for v in x]
    if type(x) is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag in COLLECTIONS and type(v) is list:
            return COLLECTIONS[tag](decode(e, depth + 1) for e in v)
        if tag == "d" and type(v) is list and all(type(kv) is list and len(kv) == 2 for kv in v):
            return {decode(k, depth + 1): decode(e, depth + 1) for k, e in v}
        if tag == "b" and type(v) is str:
            return v.encode("latin-1")
        if tag == "c" and type(v) is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
            return complex(*v)
    raise ValueError(f"not an encoded value: {str(x)[:80]}")


def write_message(fd, obj) -> None:
    data = json.dumps(obj).encode()
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data):]


def read_message(fd):
    def read_exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    return json.loads(read_exactly(int.from_bytes(read_exactly(8), "little")))


def install_guard(workdir):
    """Second layer under the namespaces (and the only one where they are unavailable): an audit
    hook that refuses writes outside `workdir`, new processes, sockets and native libraries. Python
    code can defeat it (it is reachable through gc); the kernel-level isolation cannot be."""
    real, sep = os.path.realpath, os.sep
    inside = lambda p: isinstance(p, int) or real(os.fsdecode(p)).startswith(workdir + sep)  # noqa: E731
    path_events = {"os.truncate": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.mkdir": (0,),
                   "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.utime": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,),
                   "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}
    refused = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "os.kill", "os.killpg",
               "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "sys.setprofile", "sys.settrace", "mmap.__new__", "os.chroot"}

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
            if writes and not inside(path):
                raise PermissionError("sandbox: writing outside the working folder is not allowed")
        elif event in path_events:
            if not all(inside(args[i]) for i in path_events[event] if args[i] is not None):
                raise PermissionError(f"sandbox: {event} outside the working folder is not allowed")
        elif event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(guard)


def main(argv):
    mode = argv[1]
    workdir = os.path.realpath(os.getcwd())
    with open("main.py", encoding="utf-8", errors="replace") as fh:
        source = fh.read()
    if mode == "serve":
        requests, responses = int(argv[2]), int(argv[3])
    install_guard(workdir)
    code = compile(source, "main.py", "exec", dont_inherit=True)
    namespace = {"__name__": "__main__" if mode == "script" else "solution", "__builtins__": __builtins__}
    sys.argv = ["main.py"]
    if mode == "script":
        exec(code, namespace)
        return
    exec(code, namespace)
    names, values = [], {}
    for name, value in namespace.items():
        if name.startswith("__"):
            continue
        if callable(value) and not isinstance(value, type(sys)):
            names.append(name)
        else:
            try:
                values[name] = encode(value)
            except (TypeError, ValueError, RecursionError):
                pass
    write_message(responses, ["ready", names, values])
    while True:
        try:
            name, args, kwargs = read_message(requests)
        except EOFError:
            return
        try:
            result = namespace[name](*decode(args), **decode(kwargs))
            response = ["ok", encode(result)]
        except BaseException as e:  # noqa: BLE001 - the runner decides what an error means
            response = ["raise", type(e).__name__, str(e)[:200]]
        write_message(responses, response)


if __name__ == "__main__":
    main(sys.argv)
