"""SIGTERM and SIGINT as a request to stop at the end of the current step, with a checkpoint.

A scheduler, `kill` or a preemption sends SIGTERM; Ctrl-C sends SIGINT. The first one asks the
training loop to finish the step it is in, save, and exit with 128 + the signal's number; a second
one raises KeyboardInterrupt at once (no checkpoint beyond the last).

    with graceful_stop.GracefulStop() as stop:
        while ...:
            step()
            if stop.requested:
                save(); raise SystemExit(stop.exit_code)
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once. `exit_code` is the shell's for that signal (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} again: stopped at once")
        self.exit_code = 128 + signum


class GracefulStop:
    """Handlers for SIGTERM and SIGINT while the block runs (the previous ones come back after it).
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: now
            self._restore()
            raise StopNow(signum)
        self.signum = signum
        print(f"{self.name}: finishing this step, then saving a checkpoint and stopping (send it again to stop "
              "at once, without one)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
