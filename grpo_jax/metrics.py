"""TensorBoard scalars and text through tensorboardX (host 0 only)."""

from __future__ import annotations

import math
from typing import Mapping


class MetricWriter:
    def __init__(self, logdir: str, enabled: bool = True):
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(logdir)

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if self._w is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self._w.add_scalar(k, float(v), step)

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
