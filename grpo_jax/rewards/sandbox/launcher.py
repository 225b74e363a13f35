"""The sandbox's first process: kernel limits, a drop to an unprivileged user, Linux namespaces, then
exec of the interpreter on `sandbox_server`. Standard library only (run as `python -I -S -c`).

    argv[1]: JSON {parent, workdir, cpu_s, memory, fsize, nproc, uid, gid, namespaces, python, server,
                   server_args}

With namespaces (user, mount, pid, network, ipc, uts: `unshare(2)` through ctypes, since Python 3.11
has no os.unshare):
  - network: a new, empty network namespace. Its loopback is down: no TCP, UDP or abstract unix
    socket reaches anything, not even 127.0.0.1.
  - files: every mount read-only, nosuid, nodev (`mount_setattr(2)`, recursive), with empty
    read-only tmpfs over /tmp, /var/tmp, /dev/shm and /run; the one writable folder is the run's
    own, bound at /tmp/sandbox (the working directory). A fresh /proc shows only the sandbox.
  - processes: the solution is pid 1 of its own pid namespace. When it exits or is killed, the
    kernel kills every process it started, daemons and setsid() escapees included. This launcher
    stays outside as its parent: SIGTERM makes it kill the namespace and wait until it is empty.
  - privileges: the user namespace maps one unprivileged id; capabilities inside it are lost at the
    exec of the interpreter (its uid is not 0), so the solution cannot undo the read-only mounts.
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
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
INSIDE_ID = 1000  # the sandbox's uid and gid inside its user namespace
SANDBOX_DIR = "/tmp/sandbox"
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


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


def isolate(workdir):
    """Enter new namespaces and build the read-only view; returns the working directory inside."""
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
          "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_ID} {uid} 1"), ("gid_map", f"{INSIDE_ID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    work = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # still reachable once /tmp is covered
    for path in HIDDEN:
        if os.path.isdir(path) and not os.path.islink(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=16k,mode=0755")
    os.mkdir(SANDBOX_DIR)
    mount(f"/proc/self/fd/{work}", SANDBOX_DIR, None, MS_BIND)
    os.close(work)
    mount_setattr("/", True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    mount_setattr(SANDBOX_DIR, False, attr_clr=MOUNT_ATTR_RDONLY)
    return SANDBOX_DIR


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
    if cfg["uid"] >= 0:  # started as root: become `nobody`, so that RLIMIT_NPROC and permissions apply
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        libc.prctl(PR_SET_DUMPABLE, 1)  # setuid made /proc/self root's; the id maps are written there
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
    die_with_parent(parent=cfg["parent"])  # after setuid, which would clear it
    workdir = cfg["workdir"]
    if cfg["namespaces"]:
        try:
            workdir = isolate(workdir)
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
        try:  # a /proc of this pid namespace; where the kernel refuses it, an empty one
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        drop_capabilities()
        die_with_parent(alive_fd=alive_r)
        os.close(alive_r)
    os.chdir(workdir)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    python = cfg["python"]
    os.execve(python, [python, "-I", "-S", "-c", cfg["server"], *cfg["server_args"]], env)


if __name__ == "__main__":
    main()
