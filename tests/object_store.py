"""A stand-in for an object store on the CPU: the scheme testfs:// as epath and orbax see it.

`epath.Path("testfs://run/x")` is a path object whose str() is the URI, backed by files under
`ROOT` (set per test). Orbax hands tensorstore the URI for its arrays, as it does with gs://; the
patch below gives tensorstore what its GCS driver would get, pointed at the same local files. Code
that treats the URI as a local path (os.path.abspath, open) writes a folder named "testfs:" in the
working directory instead: the tests look for one.

    with object_store.mounted(tmp_path / "bucket"):
        trainer.Trainer(cfg_with_workdir("testfs://run"))
"""

from __future__ import annotations

import contextlib
import os

from etils import epath
from etils.epath import gpath
from orbax.checkpoint._src.serialization import tensorstore_utils

PREFIX = "testfs://"
ROOT = None  # the local folder behind testfs://, while mounted


@epath.register_path_cls(PREFIX)
class TestFsPath(gpath.PosixGPath):
    def __new__(cls, *parts):
        full = "/".join(os.fspath(p) for p in parts)
        if full.startswith(PREFIX):
            if ROOT is None:
                raise RuntimeError("testfs:// is not mounted (object_store.mounted)")
            full = os.path.join(ROOT, full[len(PREFIX):])
        return super().__new__(cls, full)

    def __str__(self) -> str:
        s = self._path_str
        return PREFIX + s[len(ROOT) + 1:] if ROOT and s.startswith(ROOT + "/") else s

    def __repr__(self) -> str:
        return f"TestFsPath({str(self)!r})"


@contextlib.contextmanager
def mounted(root):
    """testfs:// backed by the folder `root` (tensorstore included) for the duration."""
    global ROOT
    uses_gcs, gcs_kvstore = tensorstore_utils._use_gcs_driver, tensorstore_utils.gcs_utils.get_kvstore_for_gcs
    os.makedirs(root, exist_ok=True)
    ROOT = os.path.abspath(root)
    # Orbax normalises the URI with os.path.normpath: testfs:/run/... reaches these.
    tensorstore_utils._use_gcs_driver = lambda d: d.startswith("testfs:/") or uses_gcs(d)
    tensorstore_utils.gcs_utils.get_kvstore_for_gcs = lambda d: (
        {"driver": "file", "path": os.path.join(ROOT, d[len("testfs:/"):].lstrip("/"))}
        if d.startswith("testfs:/") else gcs_kvstore(d))
    try:
        yield ROOT
    finally:
        ROOT = None
        tensorstore_utils._use_gcs_driver, tensorstore_utils.gcs_utils.get_kvstore_for_gcs = uses_gcs, gcs_kvstore
