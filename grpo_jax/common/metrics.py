"""What a run logs: TensorBoard scalars and text through tensorboardX (host 0 only), and stopwatches.

    writer = MetricWriter("runs/x/tb")
    writer.write({"reward": 0.5, "samples": "..."}, step)   # numbers as scalars, strings as text
    clock = Stopwatch(); ...; clock.lap("sampling")         # clock.laps["time/sampling_s"]
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

from grpo_jax.common import storage


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


class _ObjectWriter:
    """An event file on an object store (any epath URI): objects cannot be appended to, so the file
    is kept in memory and written whole at each flush (event files are kilobytes per step)."""

    def __init__(self, path: str):
        self.path, self.data = storage.path(path), bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.data))

    def close(self) -> None:
        self.flush()


class _ObjectWriters:  # tensorboardX's writer factory interface
    def open(self, path: str) -> _ObjectWriter:
        return _ObjectWriter(path)

    def directory_check(self, path: str) -> None:
        storage.path(path).mkdir(parents=True, exist_ok=True)


class MetricWriter:
    """TensorBoard events in `logdir`: a local folder or any URI epath knows (gs://...)."""

    def __init__(self, logdir: str, enabled: bool = True):
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter
            from tensorboardX import record_writer

            if not storage.is_local(logdir):  # through epath, as the checkpoints are
                record_writer.register_writer_factory(logdir.split(":", 1)[0], _ObjectWriters())
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
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(storage.path(logdir).iterdir()):
        if "tfevents" not in path.name:
            continue
        data = path.read_bytes()
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
