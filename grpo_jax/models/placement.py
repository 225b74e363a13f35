"""Where a model's parameters live on the mesh: their NamedShardings from the logical axis rules
(grpo_jax.parallel.partitioning), the dimensions a mesh cannot split, and parameters initialised
or re-placed in their layout, and cast in it."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning


def param_shardings(cfg: architecture.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> architecture.Params:
    """NamedSharding for every parameter (a pytree like the parameters)."""
    return jax.tree.map(
        lambda logical, s: NamedSharding(mesh, partitioning.to_mesh_spec(logical, s.shape, mesh, rules)),
        transformer.param_logical_axes(cfg), transformer.param_shapes(cfg), is_leaf=lambda x: isinstance(x, P))


def replicated_dims(cfg: architecture.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> list[str]:
    """Every parameter dimension that the rules would split but the mesh does not divide (so it is
    replicated instead), e.g. "layers/attn/k_proj/kernel: kv_heads 2 over tensor 4"."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(transformer.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, P))[0]
    for (path, logical), s in zip(flat, jax.tree.leaves(transformer.param_shapes(cfg))):
        wanted = tuple(nn.logical_to_mesh_axes(tuple(logical), rules))
        placed = tuple(partitioning.to_mesh_spec(logical, s.shape, mesh, rules))
        for name, dim, want, got in zip(logical, s.shape, wanted + (None,) * len(s.shape), placed):
            names = partitioning.mesh_axes(want)
            if got is None and math.prod(mesh.shape[a] for a in names) > 1:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                out.append(f"{where}: {name} {dim} over {' x '.join(names)} {math.prod(mesh.shape[a] for a in names)}")
    return out


def init_params(cfg: architecture.ModelConfig, mesh: Mesh, key: jax.Array) -> architecture.Params:
    """transformer.init_params created in place on the mesh: each device computes only its own shard
    (jit with out_shardings), so no device ever holds a whole model. The values do not depend on
    the mesh (JAX's partitionable threefry)."""
    return jax.jit(transformer.init_params, static_argnums=0, out_shardings=param_shardings(cfg, mesh))(cfg, key)


def shard_params(params: architecture.Params, cfg: architecture.ModelConfig, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES) -> architecture.Params:
    """Place (or re-place) parameters on the mesh according to the rules."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


# One program per (leaf shapes and shardings, dtype): an elementwise cast keeps each leaf's sharding.
_astype = jax.jit(lambda leaves, dtype: [x.astype(dtype) for x in leaves], static_argnums=1)


def cast(params: architecture.Params, dtype: Any, copy: bool = False) -> architecture.Params:
    """The floating-point leaves of `params` in `dtype`, each in its own layout, on device (no host
    copy). Leaves already in `dtype` are returned as they are, or copied with `copy` (a tree that
    must outlive a donation of `params`, e.g. the KL reference)."""
    dtype = jnp.dtype(dtype)
    leaves, tree = jax.tree.flatten(params)
    todo = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and (copy or x.dtype != dtype)]
    if todo:
        leaves = list(leaves)
        for i, x in zip(todo, _astype([leaves[i] for i in todo], dtype)):
            leaves[i] = x
    return jax.tree.unflatten(tree, leaves)
