"""Rows of a batch across hosts (processes): every host runs the same program on its own block of rows.

A global batch of [rows, ...] is laid out host by host in process order: host h holds rows
[h * R/H, (h + 1) * R/H). Prompts, completions and rewards are produced per host; the device
arrays span all hosts. With one process every function here is the identity (or a plain copy).

    mine = local_rows(rollout.tokens)          # this host's rows of a global array, on the host
    everyone = all_rows(rollout.lengths)       # every host's rows (for metrics)
    batch = global_batch({"ids": ids}, mesh)   # each host's numpy rows -> one array over the mesh
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from grpo_jax.parallel import partitioning


def all_rows(x: jax.Array) -> np.ndarray:
    """The whole [rows, ...] array on this host (an all-gather when it spans several hosts)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's block of rows of a [rows, ...] array whose rows are all hosts' in process order."""
    full = all_rows(x)
    m = len(full) // jax.process_count()
    return full[jax.process_index() * m:(jax.process_index() + 1) * m]


def global_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The inverse of local_rows: each host's rows stacked in process order, split over data x fsdp.

    Every device gets its rows by their index in that global order, whichever host they came from:
    a topology-aware mesh need not give each host a contiguous block of the batch axis, so a host's
    own rows are not in general its own devices' rows."""
    return place_rows(all_hosts(np.asarray(x)), mesh)


def place_rows(full: np.ndarray, mesh: Mesh) -> jax.Array:
    """A [rows, ...] array that every host holds whole, as one array split over data x fsdp: each
    device takes its rows by index."""
    if jax.process_count() == 1:
        return jax.numpy.asarray(full)
    return jax.make_array_from_callback(full.shape, partitioning.batch_sharding(mesh, full.ndim), lambda idx: full[idx])


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each host's numpy rows of a batch as one global batch laid out over the mesh's batch axes."""
    if jax.process_count() > 1:
        return {k: global_rows(v, mesh) for k, v in batch.items()}
    return partitioning.shard_batch(batch, mesh)


def all_hosts(x: np.ndarray) -> np.ndarray:
    """Every host's values of a per-host array, concatenated in process order (for metrics)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.concatenate(list(multihost_utils.process_allgather(np.asarray(x))))


def all_hosts_json(items: list) -> list:
    """Every host's list of JSON-serialisable items, concatenated in process order."""
    if jax.process_count() == 1:
        return list(items)
    blob = np.frombuffer(json.dumps(items).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int64(blob.size))))
    padded = np.zeros(size, np.uint8)
    padded[:blob.size] = blob
    return [x for part in multihost_utils.process_allgather(padded) for x in json.loads(bytes(part).rstrip(b"\0").decode())]


def host_max(values: Sequence[int]) -> tuple[int, ...]:
    """The element-wise maximum of integers over all hosts (e.g. lengths every host must pad to)."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    return tuple(int(v) for v in np.max(multihost_utils.process_allgather(np.asarray(values)), 0))


def host_bits(mask: int) -> int:
    """The union (bitwise or) of every host's bit mask."""
    if jax.process_count() == 1:
        return int(mask)
    return int(np.bitwise_or.reduce(multihost_utils.process_allgather(np.int64(mask))))


def host_sum(counts: dict[str, Any]) -> dict[str, int]:
    """Integer counts summed over all hosts."""
    if jax.process_count() == 1:
        return {k: int(v) for k, v in counts.items()}
    names = sorted(counts)
    totals = multihost_utils.process_allgather(np.asarray([counts[k] for k in names], np.int64)).sum(0)
    return dict(zip(names, (int(x) for x in totals)))


def host_block(rows: Sequence[Any], batch_size: int | None = None) -> list[Any]:
    """This host's equal block of `rows` (both the rows and `batch_size` must split over the hosts)."""
    hosts, host = jax.process_count(), jax.process_index()
    if len(rows) % hosts or (batch_size is not None and batch_size % hosts):
        raise ValueError(f"{len(rows)} problems and batch size {batch_size} must split over {hosts} hosts")
    per_host = len(rows) // hosts
    return list(rows[host * per_host:(host + 1) * per_host])
