"""One long-lived Python process with N simulated CPU devices that runs the tests' multi-device programs.

XLA fixes the device count when JAX starts, so a test that needs 8 devices runs its program in another
process. A fresh interpreter per program pays the imports (jax, flax, grpo_jax) and JAX's start each
time; this worker pays them once per pytest process (the `simulated_devices` fixture in conftest.py).
Each program runs in a fresh namespace with its stdout captured, and fails its test with its
traceback. A worker that dies (a crash, a timeout) fails that test only: the next program gets a new
worker.

    out = simulated_devices(PROGRAM, devices=8)   # the program's stdout; AssertionError if it raised
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Requests are JSON lines on stdin; each reply is one JSON line on the real stdout (the programs' own
# prints go to a buffer).
SERVER = r"""
import contextlib, io, json, sys, traceback
reply = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(request["source"], request["name"], "exec"), {"__name__": "__program__"})
        error = None
    except BaseException:  # noqa: BLE001 - the test reports it, with the traceback
        error = traceback.format_exc()
    reply.write(json.dumps({"stdout": out.getvalue(), "error": error}) + "\n")
    reply.flush()
"""


class Worker:
    """The process for one device count."""

    def __init__(self, devices: int):
        self.devices = devices
        self.proc: subprocess.Popen | None = None
        self.stderr = None  # a file, not a pipe: nobody reads it while a program runs

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={self.devices}",
               "JAX_PLATFORMS": "cpu"}
        self.stderr = tempfile.TemporaryFile("w+")
        return subprocess.Popen([sys.executable, "-u", "-c", SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-5000:]

    def run(self, source: str, name: str = "<program>", timeout: float = 900) -> str:
        """Runs `source` and returns what it printed; AssertionError with its traceback if it raised."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps({"name": name, "source": source}) + "\n")
        self.proc.stdin.flush()
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # died or timed out: its stderr says why, and the next program gets a new worker
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            why = "died" if ready else f"timed out after {timeout} s"
            raise AssertionError(f"the {self.devices}-device worker {why} running {name}:\n{self._stderr_tail()}")
        reply = json.loads(line)
        if reply["error"]:
            raise AssertionError(f"{name} on {self.devices} devices:\n{reply['stdout'][-3000:]}\n{reply['error']}\n"
                                 f"stderr: {self._stderr_tail()}")
        return reply["stdout"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stderr is not None:
            self.stderr.close()
        self.proc = self.stderr = None


class Workers:
    """A worker per device count, started on first use."""

    def __init__(self):
        self.by_count: dict[int, Worker] = {}

    def __call__(self, source: str, devices: int = 8, name: str = "<program>", timeout: float = 900) -> str:
        return self.by_count.setdefault(devices, Worker(devices)).run(source, name, timeout)

    def close(self) -> None:
        for worker in self.by_count.values():
            worker.close()
