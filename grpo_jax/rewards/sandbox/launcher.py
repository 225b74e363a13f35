"""The sandbox's first process: kernel limits, a drop to an unprivileged user, Linux namespaces, then
the server (`server.py`), in this interpreter with namespaces (one interpreter start per sandbox, not
two) and by exec of a fresh one without. Standard library only (run as `python -I -S -c`).

    argv[1]: JSON {parent, workdir, cpu_s, memory, fsize, nproc, disk, files, uid, gid, namespaces, python,
                   server, server_args}

With namespaces (user, mount, pid, network, ipc, uts: `unshare(2)` through ctypes, since Python 3.11
has no os.unshare):
  - network: a new, empty network namespace. Its loopback is down: no TCP, UDP or abstract unix
    socket reaches anything, not even 127.0.0.1.
  - files: none of the host's. The root is a fresh tmpfs (`pivot_root(2)`, the host's tree detached)
    holding read-only binds of /usr, the interpreter's prefix, the /lib* links, /dev/null, zero,
    full, random, urandom, /etc/ld.so.cache and /etc/localtime, and its own minimal /etc/passwd,
    group and hosts. The one writable folder is a tmpfs at /tmp limited in bytes and files (`disk`,
    `files`), with the working directory /tmp/sandbox holding a copy of main.py. Every other mount
    is read-only, nosuid, nodev (`mount_setattr(2)`, recursive). A fresh /proc shows only the sandbox.
  - processes: the solution is pid 1 of its own pid namespace. When it exits or is killed, the
    kernel kills every process it started, daemons and setsid() escapees included. This launcher
    stays outside as its parent: SIGTERM makes it kill the namespace and wait until it is empty.
  - privileges: the user namespace maps one unprivileged id; its capabilities are dropped before the
    exec, so the solution cannot undo the read-only mounts. `PR_SET_NO_NEW_PRIVS` and a seccomp
    filter (`seccomp_program`: EPERM for unshare, clone with CLONE_NEW*, setns, the mount family,
    chroot, keyctl, bpf, userfaultfd, io_uring, perf_event_open, ptrace, process_vm_*, module and
    kexec loading) keep the kernel's namespace, key, bpf and io_uring code out of its reach.
Both this launcher and the namespace's first process die with their parent (PR_SET_PDEATHSIG, set
after the last change of credentials, which would clear it), so a runner killed by the verifier
pool's timeout takes the whole sandbox with it.

If a namespace step fails the launcher exits with status 125 and prints why on stdout (the runner
probes for this once and falls back to the audit-hook sandbox with a warning).
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_FDCWD, AT_RECURSIVE, MNT_DETACH = -100, 0x8000, 2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, -1)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
INSIDE_ID = 1000  # the sandbox's uid and gid inside its user namespace
SANDBOX_DIR = "/tmp/sandbox"

# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 2, 0x7FFF0000, 0x50000, 0x80000000
X32_SYSCALL_BIT = 0x40000000
CLONE_NAMESPACES = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
DENIED = ("unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "open_tree", "move_mount",
          "fsopen", "fsconfig", "fsmount", "fspick", "keyctl", "add_key", "request_key", "bpf", "userfaultfd",
          "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open", "ptrace",
          "process_vm_readv", "process_vm_writev", "kexec_load", "init_module", "finit_module")
_NEW = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435}
SYSCALLS = {  # machine -> (AUDIT_ARCH_*, numbers)
    "x86_64": (0xC000003E, {**_NEW, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
                            "chroot": 161, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
                            "userfaultfd": 323, "perf_event_open": 298, "ptrace": 101, "process_vm_readv": 310,
                            "process_vm_writev": 311, "kexec_load": 246, "init_module": 175, "finit_module": 313,
                            "clone": 56}),
    "aarch64": (0xC00000B7, {**_NEW, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41,
                             "chroot": 51, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
                             "userfaultfd": 282, "perf_event_open": 241, "ptrace": 117, "process_vm_readv": 270,
                             "process_vm_writev": 271, "kexec_load": 104, "init_module": 105, "finit_module": 273,
                             "clone": 220}),
}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def mount_setattr(path, recursive, attr_set=0, attr_clr=0):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                       ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")


def isolate(workdir, python, disk, files):
    """Enter new namespaces and build the sandbox's root in `workdir` (a fresh tmpfs mounted over it):
    read-only binds of /usr, the interpreter's prefix, the /lib* links and a few /dev nodes, a minimal
    /etc, and a size-limited tmpfs at /tmp holding the working folder with the solution's main.py.
    Ends in that root (`pivot_root`) with the host's tree still at /.old, for `seal` to mount /proc
    (the kernel allows it while a full /proc is visible) and then detach."""
    uid, gid = os.getuid(), os.getgid()
    with open(os.path.join(workdir, "main.py"), "rb") as fh:
        source = fh.read()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
          "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_ID} {uid} 1"), ("gid_map", f"{INSIDE_ID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    root = workdir
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # /usr for /usr/bin/python3
    for path in ("/usr", prefix):
        if os.path.isdir(path):
            os.makedirs(root + path, exist_ok=True)
            mount(path, root + path, None, MS_BIND | MS_REC)
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path) and not os.path.exists(root + path):
            os.makedirs(root + path)
            mount(path, root + path, None, MS_BIND | MS_REC)
    for d in ("/etc", "/dev", "/proc", "/tmp", "/.old"):
        os.makedirs(root + d, exist_ok=True)
    for path in ("/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                 "/dev/urandom"):
        if os.path.exists(path):
            open(root + path, "w").close()
            mount(os.path.realpath(path), root + path, None, MS_BIND)
    for name, text in (("passwd", f"sandbox:x:{INSIDE_ID}:{INSIDE_ID}::{SANDBOX_DIR}:/bin/sh\n"),
                       ("group", f"sandbox:x:{INSIDE_ID}:\n"), ("hosts", "127.0.0.1 localhost\n")):
        with open(f"{root}/etc/{name}", "w") as fh:
            fh.write(text)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk},nr_inodes={files},mode=0755")
    os.mkdir(root + SANDBOX_DIR)
    with open(root + SANDBOX_DIR + "/main.py", "wb") as fh:
        fh.write(source)
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b".old"), "pivot_root")
    os.chdir("/")
    return SANDBOX_DIR


def seal():
    """In the pid namespace's first process: its own /proc, the host's tree detached, every mount
    read-only, nosuid, nodev except the working tmpfs."""
    try:  # a /proc of this pid namespace; where the kernel refuses it, an empty one
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount /.old")
    os.rmdir("/.old")
    mount_setattr("/", True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    mount_setattr("/tmp", False, attr_clr=MOUNT_ATTR_RDONLY)


def seccomp_program(machine):
    """A classic BPF filter (seccomp(2)) answering EPERM to the system calls that reach the kernel's
    namespace, mount, key, bpf, io_uring, perf and ptrace surfaces, and to clone() with any CLONE_NEW*
    flag; clone3 gets ENOSYS so that libc falls back to clone, whose flags the filter can read.
    Returns (instructions, arch) or None on an architecture without a table here."""
    table = SYSCALLS.get(machine)
    if table is None:
        return None
    arch, numbers = table
    deny = [numbers[name] for name in DENIED]
    prog = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ, 1, 0, arch), (BPF_RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
            (BPF_LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI's numbers (bit 30) reach the same kernel code
        prog.append((BPF_JGE, "eperm", 0, X32_SYSCALL_BIT))
    prog += [(BPF_JEQ, "eperm", 0, nr) for nr in deny]
    prog += [(BPF_JEQ, "enosys", 0, numbers["clone3"]), (BPF_JEQ, 0, "allow", numbers["clone"]),
             (BPF_LD_W_ABS, 0, 0, 16), (BPF_JSET, "eperm", 0, CLONE_NAMESPACES),
             ("allow", (BPF_RET, 0, 0, SECCOMP_RET_ALLOW)),
             ("eperm", (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | 1)),  # EPERM
             ("enosys", (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | 38))]  # ENOSYS
    labels, flat = {}, []
    for item in prog:
        if isinstance(item[0], str):
            labels[item[0]] = len(flat)
            item = item[1]
        flat.append(item)
    target = lambda j, i: j if isinstance(j, int) else labels[j] - i - 1  # noqa: E731 - relative jumps
    return [(code, target(jt, i), target(jf, i), k) for i, (code, jt, jf, k) in enumerate(flat)]


def restrict():
    """no_new_privs (nothing exec'd can gain privileges) and the seccomp filter."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    prog = seccomp_program(os.uname().machine)
    if prog is None:
        return
    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(SockFilter)))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def drop_capabilities():
    """Drop the namespace's capabilities now rather than at exec: a credential change clears the
    parent-death signal, so it must come before that is set (and exec then changes nothing)."""
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()), "capset")


def die_with_parent(alive_fd=None, parent=None):
    """SIGKILL when the parent dies (PR_SET_PDEATHSIG), and exit if it already has."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(137)
    if alive_fd is not None and select.select([alive_fd], [], [], 0)[0]:  # EOF: the writer is gone
        os._exit(137)


def supervise(child):
    """Outside the pid namespace: wait for its first process; on SIGTERM kill it (the kernel then
    kills the rest) and wait until the namespace is empty."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def main():
    cfg = json.loads(sys.argv[1])
    for limit, value in ((resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
                         (resource.RLIMIT_AS, (cfg["memory"],) * 2), (resource.RLIMIT_FSIZE, (cfg["fsize"],) * 2),
                         (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)
    if cfg["uid"] >= 0:  # started as root: become the sandbox uid, so that RLIMIT_NPROC and permissions apply
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        libc.prctl(PR_SET_DUMPABLE, 1)  # setuid made /proc/self root's; the id maps are written there
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
    die_with_parent(parent=cfg["parent"])  # after setuid, which would clear it
    workdir = cfg["workdir"]
    if cfg["namespaces"]:
        try:
            workdir = isolate(workdir, cfg["python"], cfg["disk"], cfg["files"])
        except OSError as e:
            print(f"sandbox-unavailable: {e}", flush=True)
            os._exit(125)
        os.chdir(workdir)
        alive_r, alive_w = os.pipe()  # open in the launcher while it lives
        child = os.fork()
        if child:
            os.close(alive_r)
            supervise(child)
        os.close(alive_w)
        seal()
        drop_capabilities()
        die_with_parent(alive_fd=alive_r)
        os.close(alive_r)
        restrict()
    os.chdir(workdir)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    if cfg["namespaces"]:
        # The server in this interpreter: no second interpreter start per sandbox (a third of its
        # cost). What the launcher loaded stays reachable (ctypes), which only matters to the audit
        # hook, and the kernel's layers above hold without it.
        os.environ.clear()
        os.environ.update(env)
        sys.dont_write_bytecode = True
        sys.stdout.reconfigure(encoding="utf-8")
        sys.argv = ["-c", *cfg["server_args"]]
        server = compile(cfg["server"], "<server>", "exec")
        exec(server, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 - our own server
        sys.exit(0)
    python = cfg["python"]  # without namespaces the audit hook is the guard: a fresh interpreter
    os.execve(python, [python, "-I", "-S", "-c", cfg["server"], *cfg["server_args"]], env)


if __name__ == "__main__":
    main()
