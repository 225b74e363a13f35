"""The device mesh, the logical axis names and the rules that map them onto its (data, fsdp, expert,
tensor) axes, and where batches live on it: the one place that decides how parameters and
activations are laid out.

Parameters name their dimensions (`embed`, `heads`, `mlp`, `vocab`, ...; transformer.param_logical_axes);
activations name theirs with an `activation_` prefix, because the two must map differently: a weight's
`embed` dimension is split over fsdp (ZeRO-3: each device stores 1/fsdp of every weight), while an
activation's embed dimension stays whole and its batch is split over data x fsdp. Without the
activation constraints XLA resolves the conflict in favour of the weights and runs fsdp as a
tensor-parallel split of d_model (full-batch activations on every device, all-reduced per layer);
with them it all-gathers each layer's weights for its use and reduce-scatters the gradients.

    x = partitioning.constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Mesh axes that split the rows of a batch. `expert` is one of them: outside the MoE layers it is one
# more data-parallel axis, inside them it splits the experts (expert parallelism, carved out of data
# parallelism as in GShard and Megatron-LM: moe.MoE gathers the expert group's tokens).
BATCH = ("data", "fsdp", "expert")

Rules = Sequence[tuple[str, Any]]
RULES: Rules = (
    # parameters: ZeRO-3 over fsdp on `embed`, Megatron over tensor on heads / MLP / vocab
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),  # MoE: each device of the expert axis stores E / expert of the experts
    ("head_dim", None),
    ("norm", None),
    # activations: rows over data x fsdp, the same tensor split as the weights that make them
    ("batch", BATCH),
    ("activation_batch", BATCH),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

# Inference (sampling) layout of the weights: split over tensor only, whole on every data and fsdp
# device, so a decode step reads local weights instead of all-gathering every layer per token.
INFERENCE_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in RULES)

RESIDUAL = ("activation_batch", "activation_length", "activation_embed")  # [batch, seq, d]


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch's rows split over `mesh` (the product of the BATCH axes)."""
    return math.prod(mesh.shape[a] for a in BATCH if a in mesh.shape)


def mesh_axes(axes: Any) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = RULES) -> P:
    """Map logical axis names to a PartitionSpec of mesh axes, replicating any dimension the mesh does
    not divide (e.g. Qwen2.5-0.5B's 2 KV heads on a tensor axis of 4, or a batch of 1)."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = math.prod(mesh.shape[a] for a in mesh_axes(axes))
        out.append(axes if size > 1 and dim % size == 0 else None)
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None] | P, mesh: Mesh | None, rules: Rules = RULES) -> jax.Array:
    """with_sharding_constraint of x by logical axis names (or by a PartitionSpec of mesh axes, as
    given); the identity without a mesh (or on one device)."""
    if mesh is None or mesh.size == 1:
        return x
    spec = logical if isinstance(logical, P) else to_mesh_spec(logical, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def row_axes(rows: int, mesh: Mesh | None) -> Any:
    """The mesh axes that split `rows` rows of a batch (the `activation_batch` rule: data x fsdp x
    expert), or None where the mesh does not divide them (the rows are then replicated): the
    PartitionSpec entry of a batch dimension inside shard_map and in explicit shardings."""
    return None if mesh is None else to_mesh_spec(("activation_batch",), (rows,), mesh)[0]


def shard_index(index: jax.Array, axis: str | None, shard_size: int) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map, for global indices into a dimension split over mesh `axis` in shards of
    `shard_size` (e.g. token ids into a vocab-parallel table): (the index within this device's shard,
    clipped into range, and whether the index is held here)."""
    first = 0 if axis is None else jax.lax.axis_index(axis) * shard_size
    local = index - first
    return jnp.clip(local, 0, shard_size - 1), (local >= 0) & (local < shard_size)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              expert: int = 1, dcn_data: int = 1) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (all by default); one size may be -1 (the
    rest). tensor is the innermost axis (neighbouring devices: the fastest links), then expert.

    Over all devices the order is topology-aware (`mesh_utils.create_device_mesh`: on a TPU slice the
    axes follow its ICI rings). dcn_data > 1 splits `data` over that many granules joined by the data
    centre network (TPU slices of a multi-slice job, else hosts: `create_hybrid_device_mesh`), so only
    the data axis's gradient all-reduce crosses it; explicit `devices` are laid out in the order given."""
    explicit = devices is not None
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
    if dcn_data < 1 or sizes[0] % dcn_data:
        raise ValueError(f"mesh.dcn_data={dcn_data}: expected a divisor of the data axis ({sizes[0]})")
    if explicit:
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    if dcn_data > 1:
        slices = devices[0].platform == "tpu"  # a multi-slice TPU job's slices; else one granule per host
        granules = len({d.slice_index if slices else d.process_index for d in devices})
        if granules != dcn_data:
            raise ValueError(f"mesh.dcn_data={dcn_data}: the devices form {granules} "
                             + ("TPU slices" if slices else "hosts") + "; expected as many")
        ici = (sizes[0] // dcn_data, *sizes[1:])
        order = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1, 1, 1), devices, process_is_granule=not slices)
    else:
        order = mesh_utils.create_device_mesh(sizes, devices)
    return Mesh(order, MESH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch split over (data, fsdp, expert), the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


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
    if rows % batch_shards(mesh):
        return batch
    return jax.device_put(batch, {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()})
