"""One short uninterrupted GRPO run of scripts/train.py that several tests read: the session fixture
`short_run_dir` (conftest.py) runs it once for the whole suite, xdist workers included.

Tests that compare against it (SIGTERM and resume, damaged checkpoints, failed saves) start their own
runs from `command(...)` with the same arguments, so only what they change differs. A test that writes
into the run copies it first (`copy`): the fixture's folder is read by others.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
ARGS = ["--config.cold_start.steps=0", f"--config.steps={STEPS}", "--config.grpo.prompts_per_step=4",
        "--config.grpo.num_generations=4", "--config.eval.every=0", "--config.data.eval_size=4",
        "--config.eval.k=1", "--config.verifier.workers=1", "--config.log.every=1",
        "--config.checkpoint.every=2"]  # checkpoints 4, 6 and 8 are kept (checkpoint.keep=3)


def command(workdir, *extra: str) -> list[str]:
    """scripts/train.py on the short run's arguments, then `extra` (a repeated field: the last wins)."""
    return [sys.executable, "scripts/train.py", f"--config.workdir={workdir}", *ARGS, *extra]


def ensure(root) -> str:
    """The run's workdir under `root`, running it first unless a process sharing `root` already did."""
    workdir, done = os.path.join(root, "short_run"), os.path.join(root, "short_run.done")
    with open(os.path.join(root, "short_run.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other xdist worker waits for the run instead of repeating it
        if not os.path.exists(done):
            shutil.rmtree(workdir, ignore_errors=True)
            p = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, f"the short run failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
            with open(os.path.join(root, "short_run.stdout"), "w") as f:
                f.write(p.stdout)
            open(done, "w").close()
    return workdir


def copy(workdir, to) -> str:
    """A private copy of the run to write into (resume it, damage it)."""
    shutil.copytree(workdir, to)  # its .lock file too: a lock is the kernel's, not the file's
    return str(to)
