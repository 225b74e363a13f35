"""One run per workdir: a lock on WORKDIR/.lock, held while the run trains.

A second run into a busy workdir stops at once with the holder's pid, host, start time and command.
Only JAX process 0 locks: the other hosts of a multi-host run share its workdir.

On a local disk the lock is the kernel's (fcntl.lockf): it goes away with the process that held it,
so a run killed with -9 leaves a file that the next run simply takes over. An object store
(gs://...) has no locks: there .lock is a lease, renewed by `refresh` (the trainer calls it every
step) and taken over once it is `LEASE_S` old, so a killed run blocks its workdir for at most that.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid

from grpo_jax.common import storage

LEASE_S = 600.0  # an object-store lock older than this belongs to a run that is gone


class WorkdirBusy(RuntimeError):
    pass


def _holder() -> str:
    return (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({' '.join(sys.argv)[:300]})")


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike):
        self.root = storage.path(workdir)
        self.path = self.root / ".lock"
        self._fh = None
        self._lease: dict | None = None  # an object store's: {"holder", "token", "renewed"}

    def _busy(self, holder: str, why: str = "") -> WorkdirBusy:
        return WorkdirBusy(f"{self.root} is in use by {holder}{why}: wait for that run, stop it, or give this one "
                           "another workdir (--config.workdir=...)")

    def acquire(self) -> WorkdirLock:
        self.root.mkdir(parents=True, exist_ok=True)
        if not storage.is_local(self.root):
            return self._take_lease()
        fh = open(self.path, "a+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise self._busy(holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(_holder() + "\n")
        fh.flush()
        self._fh = fh
        return self

    def _read_lease(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # none, or one being written: treated as free
            return None

    def _take_lease(self) -> WorkdirLock:
        held = self._read_lease()
        if held is not None and time.time() - held.get("renewed", 0) < LEASE_S:
            age = time.time() - held["renewed"]
            raise self._busy(held.get("holder", "another run"),
                             f" (its lease was renewed {age:.0f} s ago; one not renewed for {LEASE_S:.0f} s is "
                             f"taken over, or delete {self.path} if that run is gone)")
        self._lease = {"holder": _holder(), "token": uuid.uuid4().hex, "renewed": time.time()}
        self.path.write_text(json.dumps(self._lease))
        # Two runs that start together both write: the last write wins, and the other sees it here.
        if (self._read_lease() or {}).get("token") != self._lease["token"]:
            self._lease = None
            raise self._busy((self._read_lease() or {}).get("holder", "another run"), " (it started at the same time)")
        return self

    def refresh(self, every_s: float = LEASE_S / 10) -> None:
        """Renew an object-store lease (at most once per `every_s`); nothing on a local disk."""
        if self._lease is not None and time.time() - self._lease["renewed"] >= every_s:
            self._lease["renewed"] = time.time()
            self.path.write_text(json.dumps(self._lease))

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the lock; the file stays (its text is the last holder)
            self._fh = None
        if self._lease is not None:
            if (self._read_lease() or {}).get("token") == self._lease["token"]:
                self.path.unlink(missing_ok=True)
            self._lease = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
