"""One run per workdir: an exclusive lock on WORKDIR/.lock, held while the run trains.

A second run into a busy workdir stops at once with the holder's pid, host, start time and command.
The lock is the kernel's (fcntl.lockf): it goes away with the process that held it, so a run killed
with -9 leaves a file that the next run simply takes over. Only JAX process 0 locks: the other hosts
of a multi-host run share its workdir.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time


class WorkdirBusy(RuntimeError):
    pass


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fh = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by {holder}: wait for that run, stop it, or "
                              "give this one another workdir (--config.workdir=...)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                 f"({' '.join(sys.argv)[:300]})\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the lock; the file stays (its text is the last holder)
            self._fh = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
