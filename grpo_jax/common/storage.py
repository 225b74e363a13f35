"""Where a run's files live: a local folder or an object store (gs://bucket/run), through etils.epath.

Orbax reads and writes checkpoints through epath; so does every other file of a workdir (the lock,
manifests, stage markers, config.json, TensorBoard events, rejection samples), so a workdir may be
any URI epath knows. Local paths are made absolute; a URI is left as it is (os.path.abspath would
turn gs://b/run into a local folder named "gs:").

    root = storage.path(cfg.workdir)                 # epath.Path
    storage.write_text(root / "stage.json", text)    # atomic: a reader sees all of it or none
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

from etils import epath


def is_local(p: str | os.PathLike) -> bool:
    """Whether `p` names a local file (no scheme://)."""
    return "://" not in str(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a URI as it is, a local path absolute (and ~ expanded)."""
    if is_local(p):
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))
    try:
        return epath.Path(str(p))
    except KeyError:  # epath's answer for a scheme it has no filesystem for
        raise ValueError(f"{str(p)!r}: epath knows no filesystem for {str(p).split('://')[0]}:// (expected a local "
                         "path or a URI such as gs://bucket/folder)") from None


def write_text(p: str | os.PathLike, text: str) -> None:
    """Write `text` to `p` atomically: locally through a temporary file renamed over it (a reader or
    a kill never sees half of it); an object store's write of one object is atomic already."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(p):
        p.write_text(text)
        return
    tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def read_json(p: str | os.PathLike) -> Any:
    return json.loads(path(p).read_text())


def free_bytes(p: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds `p` (or its nearest existing parent); None for an object store."""
    if not is_local(p):
        return None
    p = os.path.abspath(os.fspath(p))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free
