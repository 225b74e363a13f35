"""What a run logs: TensorBoard scalars and text through tensorboardX (host 0 only), and stopwatches.

    writer = MetricWriter("runs/x/tb")
    writer.write({"reward": 0.5, "samples": "..."}, step)   # numbers as scalars, strings as text
    clock = Stopwatch(); ...; clock.lap("sampling")         # clock.laps["time/sampling_s"]
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping


class Stopwatch:
    """Seconds between laps: `lap("update")` adds the time since the previous lap to `time/update_s`
    (a phase that recurs, such as sampling rounds, sums)."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        key = f"time/{name}_s"
        self.laps[key] = self.laps.get(key, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        """Seconds from the start to the last lap."""
        return self._last - self.start


class MetricWriter:
    def __init__(self, logdir: str, enabled: bool = True):
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(logdir)

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite numbers as one event of scalars, under their own names: tensorboardX's add_scalar
        would store eval/pass@1 as eval/pass_1 (TensorFlow's op-name rule), which TensorBoard does
        not need, and the console and event files would disagree."""
        if self._w is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if values:
            self._w._get_file_writer().add_summary(Summary(value=values), step)

    def write(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers as scalars, strings as text."""
        self.scalars(metrics, step)
        for k, v in metrics.items():
            if isinstance(v, str):
                self.text(k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()




def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in `logdir`, as {tag: [(step, value), ...]} (for plots and tests)."""
    import os
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(logdir, name), "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: length, crc, payload, crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
