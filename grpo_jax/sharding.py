"""The device mesh and where parameters and batches live on it.

Parameters carry logical axis names (model.param_logical_axes); grpo_jax.partitioning's rules map them
onto a mesh with axes (data, fsdp, expert, tensor): the batch is split over data x fsdp x expert,
weights are split over fsdp (ZeRO-3 style) on their `embed` dimension, over tensor on heads / MLP /
vocab (Megatron style) and, for mixture-of-experts layers, over expert on the experts. The inference layout used for sampling keeps only the tensor split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grpo_jax import model
from grpo_jax import partitioning

def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              expert: int = 1) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (all by default); one size may be -1 (the
    rest). tensor is the innermost axis (neighbouring devices: the fastest links), then expert."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, expert, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes (data, fsdp, expert, tensor)={tuple(sizes)}: positive, at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {tuple(sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh (data, fsdp, expert, tensor)={tuple(sizes)} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), partitioning.MESH_AXES)


def param_shardings(cfg: model.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> model.Params:
    """NamedSharding for every parameter (a pytree like the parameters)."""
    return jax.tree.map(
        lambda logical, s: NamedSharding(mesh, partitioning.to_mesh_spec(logical, s.shape, mesh, rules)),
        model.param_logical_axes(cfg), model.param_shapes(cfg), is_leaf=lambda x: isinstance(x, P))


def replicated_dims(cfg: model.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> list[str]:
    """Every parameter dimension that the rules would split but the mesh does not divide (so it is
    replicated instead), e.g. "layers/attn/k_proj/kernel: kv_heads 2 over tensor 4"."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(model.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, P))[0]
    for (path, logical), s in zip(flat, jax.tree.leaves(model.param_shapes(cfg))):
        wanted = tuple(nn.logical_to_mesh_axes(tuple(logical), rules))
        placed = tuple(partitioning.to_mesh_spec(logical, s.shape, mesh, rules))
        for name, dim, want, got in zip(logical, s.shape, wanted + (None,) * len(s.shape), placed):
            names = partitioning.mesh_axes(want)
            if got is None and math.prod(mesh.shape[a] for a in names) > 1:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                out.append(f"{where}: {name} {dim} over {' x '.join(names)} {math.prod(mesh.shape[a] for a in names)}")
    return out


def init_params(cfg: model.ModelConfig, mesh: Mesh, key: jax.Array) -> model.Params:
    """model.init_params created in place on the mesh: each device computes only its own shard
    (jit with out_shardings), so no device ever holds a whole model. The values do not depend on
    the mesh (JAX's partitionable threefry)."""
    return jax.jit(model.init_params, static_argnums=0, out_shardings=param_shardings(cfg, mesh))(cfg, key)


def shard_params(params: model.Params, cfg: model.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> model.Params:
    """Place (or re-place) parameters on the mesh according to the rules."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch split over (data, fsdp, expert), the rest replicated."""
    return NamedSharding(mesh, P(partitioning.BATCH, *([None] * (ndim - 1))))


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Replicate on the mesh every leaf not already placed on it (e.g. the step counts of a fresh
    optax state), so a jitted step sees the same shardings on its first and later calls and does
    not compile twice."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        and x.sharding.mesh == mesh else jax.device_put(x, replicated), tree)


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Place a [rows, ...] batch with its rows split over (data, fsdp, expert), when they divide evenly (else
    as it is: the sampler replicates such batches too)."""
    rows = len(next(iter(batch.values())))
    if rows % partitioning.batch_shards(mesh):
        return batch
    return jax.device_put(batch, {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()})
