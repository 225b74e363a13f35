"""A verifier worker process: `python -m grpo_jax.rewards.pool_worker SPEC` (started by
`verifier_pool.VerifierPool`; a small entry module, so a worker never re-imports the training script).

SPEC (JSON): {"fd": socket to the pool, "progress": file of two int64/float64 slots, "memory_mb",
"scratch": this worker's temporary folder, "sys_path": the pool's sys.path, "main_path": the pool's
main script or null}. The main script is run (as "__mp_main__", so its `if __name__ == "__main__":`
part does not) only when a reward function defined in it arrives.

Protocol (multiprocessing Connection, pickled):
    pool -> worker: (pickled fn, prompts, completions, columns) a chunk of items; None to stop
    worker -> pool: [("ok", float | None) | ("error", str), ...] one entry per item
Before each item the worker bumps the progress counter and writes the item's start time
(CLOCK_MONOTONIC, shared by all processes): the pool reads them to time out the item that hangs
without a message per item, and to know which items of the chunk were not scored. While it loads a
reward function (unpickling imports its module, or runs the main script) the third slot holds when
loading began, so that the pool can time out a load that hangs too.
"""

import json
import math
import mmap
import pickle
import resource
import runpy
import signal
import struct
import sys
import tempfile
import time
from multiprocessing.connection import Connection

PROGRESS = struct.Struct("<qdd")  # items started by this worker, start of the current one, start of a load (0: none)


def checked(values, n: int) -> list[tuple[str, float | None | str]]:
    """A reward function's return value for n completions as n results, ("ok", float or None) or
    ("error", why): a value that is not a number or None, NaN or inf is an error of its item; a
    return value that is not a sequence of n of them is an error of every item."""
    try:
        values = list(values)
    except TypeError:
        return [("error", f"returned {type(values).__name__}, expected a list of {n} numbers")] * n
    if len(values) != n:
        return [("error", f"returned {len(values)} values for {n} completion{'s' * (n != 1)}")] * n
    return [_checked_value(v) for v in values]


def _checked_value(v) -> tuple[str, float | None | str]:
    if v is None:
        return "ok", None
    # Numbers, numpy and JAX scalars have __float__; strings and lists do not.
    if isinstance(v, (str, bytes)) or not hasattr(type(v), "__float__") or getattr(v, "shape", ()) != ():
        return "error", f"returned {type(v).__name__} {str(v)[:40]!r}, expected a number or None"
    x = float(v)
    return ("ok", x) if math.isfinite(x) else ("error", f"returned {x}: rewards must be finite (None: not applicable)")


def score_chunk(fn, prompts, completions, columns, progress: mmap.mmap, started: int) -> tuple[list, int]:
    results = []
    for j, (prompt, completion) in enumerate(zip(prompts, completions)):
        started += 1
        PROGRESS.pack_into(progress, 0, started, time.monotonic(), 0.0)
        try:
            results += checked(fn([prompt], [completion], **{k: [v[j]] for k, v in columns.items()}), 1)
        except BaseException as e:  # noqa: BLE001 - a reward error must come back, not kill the worker
            results.append(("error", f"{type(e).__name__}: {str(e)[:300]}"))
    return results, started


def load_fn(data: bytes, main_path: str | None):
    """Unpickle a reward function; one defined in the pool's main script needs that script loaded."""
    try:
        return pickle.loads(data)
    except AttributeError:
        main = sys.modules["__main__"]
        if not main_path or getattr(main, "__grpo_main_loaded__", False):
            raise
        for name, value in runpy.run_path(main_path, run_name="__mp_main__").items():
            if not name.startswith("__"):
                setattr(main, name, value)
        main.__grpo_main_loaded__ = True
        return pickle.loads(data)


def main(spec: dict) -> None:
    # Ctrl-C reaches the whole process group: the trainer stops its workers itself, quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = spec["sys_path"]
    tempfile.tempdir = spec["scratch"]  # sandboxes' folders: the pool removes this one if it kills us
    if spec["memory_mb"]:
        limit = spec["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn = Connection(spec["fd"])
    with open(spec["progress"], "r+b") as fh:
        progress = mmap.mmap(fh.fileno(), PROGRESS.size)
    started = 0
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn_bytes, prompts, completions, columns = msg
        PROGRESS.pack_into(progress, 0, started, 0.0, time.monotonic())
        try:
            fn = load_fn(fn_bytes, spec["main_path"])
        except Exception as e:  # noqa: BLE001 - e.g. a function this worker cannot import
            results = [("error", f"cannot load the reward function: {type(e).__name__}: {e}")] * len(completions)
        else:
            results, started = score_chunk(fn, prompts, completions, columns, progress, started)
        try:
            conn.send(results)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
