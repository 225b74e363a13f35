"""Worker processes that score completions so that a hostile one cannot hurt the trainer.

    with VerifierPool(num_workers=2, timeout_s=10) as pool:
        rewards, counts = pool.map(fn, prompts, completions, columns)

Items travel in chunks (one message per chunk each way, not per completion), yet each item has its
own wall-clock limit: a worker records in a shared file which item it is on and when it started it
(`pool_worker.PROGRESS`), and the pool kills a worker whose current item is over `timeout_s`. That
item scores 0 and is counted as a timeout; the chunk's other unanswered items go back to the queue.
A crash (segfault, OOM kill, os._exit) is attributed the same way. A spare worker is kept started,
so a kill costs no start-up wait. Workers run `python -m grpo_jax.rewards.pool_worker`: they do not
re-import the training script (only a reward function defined in it makes them load it). Each worker
has its own temporary folder, removed with the worker, so a sandbox killed with it leaves nothing.
"""

from __future__ import annotations

import collections
import json
import math
import mmap
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from grpo_jax.rewards import pool_worker

RewardFn = Callable[..., list]
MAX_CHUNK = 64  # items per message; smaller chunks when there are few items per worker


OWNER = "owner"  # in a worker's folder: "pid start-time" of the pool's process


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), or None when there is none: with
    the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def remove_stale_folders(tmp: str | None = None) -> list[str]:
    """Remove the worker folders of pools whose process is gone (a trainer killed with SIGKILL cannot
    remove its own); returns them. Folders of live pools, and folders without an owner record, stay."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith("grpo_worker_"):
            continue
        try:
            with open(os.path.join(path, OWNER)) as fh:
                pid, start = fh.read().split()
        except (OSError, ValueError):
            continue
        if _process_start(int(pid)) != start:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class _Worker:
    """One worker process, its connection, its progress slots and its folder."""

    def __init__(self, memory_mb: int):
        self.scratch = tempfile.mkdtemp(prefix="grpo_worker_")
        os.chmod(self.scratch, 0o711)  # an unprivileged sandbox user must reach its folder inside
        with open(os.path.join(self.scratch, OWNER), "w") as fh:
            fh.write(f"{os.getpid()} {_process_start(os.getpid())}")
        progress_path = os.path.join(self.scratch, "progress")
        with open(progress_path, "wb") as fh:
            fh.write(b"\0" * pool_worker.PROGRESS.size)
        with open(progress_path, "r+b") as fh:
            self.progress = mmap.mmap(fh.fileno(), pool_worker.PROGRESS.size)
        ours, theirs = socket.socketpair()
        main_path = getattr(sys.modules["__main__"], "__file__", None)
        spec = {"fd": theirs.fileno(), "progress": progress_path, "memory_mb": memory_mb, "scratch": self.scratch,
                "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
                "main_path": os.path.abspath(main_path) if main_path else None}
        self.proc = subprocess.Popen([sys.executable, "-m", "grpo_jax.rewards.pool_worker", json.dumps(spec)],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        self.answered = 0  # items this worker has returned results for
        self.chunk: list[int] | None = None  # the items it is scoring now

    def await_ready(self, timeout_s: float = 300.0) -> None:
        if self.ready:
            return
        try:
            self.ready = self.conn.poll(timeout_s) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            self.ready = False
        if not self.ready:
            self.kill()
            raise RuntimeError(f"a verifier worker did not start (exit code {self.proc.returncode}); run "
                               f"`{sys.executable} -m grpo_jax.rewards.pool_worker` to see why, or score in this "
                               "process (the trainer's verifier.workers=-1)")

    def current(self) -> tuple[int, float]:
        """(index in the chunk of the item being scored, when it started)."""
        started, since, _ = pool_worker.PROGRESS.unpack_from(self.progress, 0)
        return started - self.answered - 1, since

    def loading_since(self) -> float:
        """When it began loading the reward function of its chunk, or 0.0 when it is not loading one."""
        return pool_worker.PROGRESS.unpack_from(self.progress, 0)[2]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()
        self.progress.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.wait(2)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class VerifierPool:
    """Persistent worker processes that score completions under a per-item wall-clock limit.

    Args:
      num_workers: processes scoring at once (default: the number of CPUs); one spare more is kept
        started.
      timeout_s: wall-clock limit per item; past it the worker is killed and replaced.
      memory_mb: address-space limit of each worker (a memory bomb raises MemoryError there).
      load_timeout_s: wall-clock limit on loading a reward function in a worker (importing its module);
        a load past it is taken as a function that hangs on every item (`hung`).
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 10.0, memory_mb: int = 4096,
                 load_timeout_s: float = 120.0):
        self.num_workers = num_workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.memory_mb = memory_mb
        remove_stale_folders()
        self.last_error: str | None = None
        self._workers = [_Worker(memory_mb) for _ in range(self.num_workers)]
        self._spare = _Worker(memory_mb)
        for w in self._workers:
            w.await_ready()

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._spare.await_ready()
        self._workers[i], self._spare = self._spare, _Worker(self.memory_mb)

    def map(self, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
            columns: dict[str, Sequence[Any]], hang_after: int | None = None) -> tuple[list[float | None], dict[str, Any]]:
        """fn on each (prompt, completion, row of columns). Returns the rewards and the counts of
        timeouts, crashes and errors (an item that times out, crashes its worker, raises or returns
        something that is not a finite number or None scores 0), `last_error`, and `hung`.

        hang_after: when this many items have timed out and none has finished (min(n, hang_after)),
          the function is taken to hang on every item: the rest are not run (counted as timeouts and
          as `abandoned`) and `hung` is True. None: run every item.
        """
        n = len(completions)
        results: list[float | None] = [0.0] * n
        stats: dict[str, Any] = {"timeouts": 0, "crashes": 0, "errors": 0, "last_error": None, "hung": False,
                                 "abandoned": 0}
        finished = 0
        fn_bytes = pickle.dumps(fn)
        size = max(1, min(MAX_CHUNK, math.ceil(n / (4 * self.num_workers))))
        queue = collections.deque(list(range(s, min(n, s + size))) for s in range(0, n, size))

        def give_up(w: int, kind: str) -> None:
            """The worker's current item timed out or crashed it: count it, requeue the rest."""
            nonlocal finished
            worker = self._workers[w]
            k, _ = worker.current()
            k = min(max(k, 0), len(worker.chunk) - 1)
            stats[kind] += 1
            finished += k  # the chunk's items before it ran to the end (they are scored again)
            rest = worker.chunk[:k] + worker.chunk[k + 1:]
            if rest:
                queue.appendleft(rest)
            self._replace(w)

        while queue or any(w.chunk is not None for w in self._workers):
            for w, worker in enumerate(self._workers):
                if worker.chunk is None and queue:
                    chunk = queue.popleft()
                    msg = (fn_bytes, [prompts[i] for i in chunk], [completions[i] for i in chunk],
                           {k: [v[i] for i in chunk] for k, v in columns.items()})
                    try:
                        worker.conn.send(msg)
                    except (BrokenPipeError, OSError):  # died while idle: a fresh one takes the chunk
                        self._replace(w)
                        worker = self._workers[w]
                        worker.conn.send(msg)
                    worker.chunk = chunk
            busy = {worker.conn: w for w, worker in enumerate(self._workers) if worker.chunk is not None}
            deadline = min(self._deadline(self._workers[w]) for w in busy.values())
            # The worker may not have started its first item yet (its slot holds an older time):
            # never wait less than a short poll, then look again.
            for conn in wait(list(busy), timeout=max(0.01, deadline - time.monotonic())):
                w = busy[conn]
                worker = self._workers[w]
                try:
                    answers = conn.recv()
                except (EOFError, OSError):
                    give_up(w, "crashes")
                    continue
                for i, (status, value) in zip(worker.chunk, answers):
                    if status == "ok":
                        results[i] = value
                    else:
                        stats["errors"] += 1
                        self.last_error = stats["last_error"] = value
                finished += len(worker.chunk)
                worker.answered += len(worker.chunk)
                worker.chunk = None
            now = time.monotonic()
            loads = [worker.loading_since() for worker in self._workers if worker.chunk is not None]
            if any(0 < t <= now - self.load_timeout_s for t in loads):  # it cannot even be loaded: it hangs
                self.last_error = stats["last_error"] = (
                    f"loading the reward function took over {self.load_timeout_s:g} s (verifier.load_timeout_s)")
                self._abandon(queue, stats)
                break
            for w, worker in enumerate(self._workers):
                if worker.chunk is not None:
                    k, since = worker.current()
                    if k >= 0 and not worker.loading_since() and now - since >= self.timeout_s:
                        give_up(w, "timeouts")
            if hang_after and not finished and stats["timeouts"] >= min(n, hang_after):
                self._abandon(queue, stats)
                break
        return results, stats

    def _deadline(self, worker: _Worker) -> float:
        """When to look at `worker` again: its item's deadline, or while it loads the function, soon
        (its first item starts when the load ends, and no message says so)."""
        loading = worker.loading_since()
        if loading:
            return min(loading + self.load_timeout_s, time.monotonic() + 0.05)
        return worker.current()[1] + self.timeout_s

    def _abandon(self, queue: collections.deque, stats: dict[str, Any]) -> None:
        """Stop running a function that hangs: its queued and in-flight items count as timeouts."""
        stats["hung"] = True
        stats["abandoned"] = sum(len(chunk) for chunk in queue)
        queue.clear()
        for w, worker in enumerate(self._workers):
            if worker.chunk is not None:
                stats["abandoned"] += len(worker.chunk)
                self._replace(w)
        stats["timeouts"] += stats["abandoned"]

    def close(self) -> None:
        for worker in [*self._workers, self._spare]:
            worker.stop()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
