"""A persistent XLA compilation cache for a run: a restarted or resumed run (and the next stage of
a pipeline, in a fresh process) loads the programs it compiled before instead of compiling them
again, which for a large model's update and decode loop takes minutes.

    compilation_cache.enable(cfg.compilation_cache)   # scripts/train.py, before anything compiles

`JAX_COMPILATION_CACHE_DIR` in the environment wins over the config (the test suite sets it). JAX
keys each entry by the program, its shardings, the compiler version and flags and the devices, so a
changed program or machine misses and compiles; entries are only ever added (keep the folder on a
local disk; `rm -r` it to reclaim the space).
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass
class Stats:
    """Programs this process loaded from the cache (hits) and compiled (misses), counted from JAX's
    monitoring events once `enable` has run."""

    folder: str | None = None
    hits: int = 0
    misses: int = 0

    def _count(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.misses += 1

    def summary(self) -> str:
        return (f"XLA compilation cache {self.folder}: {self.hits} programs loaded, {self.misses} compiled"
                if self.folder else "XLA compilation cache: off")


def enable(path: str | None, min_compile_time_s: float = 0.0) -> Stats:
    """Cache the compilations that take at least `min_compile_time_s` (0: every one; a run's few
    dozen programs take about 1 MB; $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides) in `path`
    (~ expanded). Returns the counts of this process's hits and misses; their `folder` is None when
    the cache is off ("" or None, and no environment setting)."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (os.path.expanduser(path) if path else None)
    stats = Stats(folder)
    if folder is None:
        return stats
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", min_compile_time_s)))
    jax.monitoring.register_event_listener(stats._count)
    return stats
