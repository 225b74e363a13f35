"""The decoder's small layers: rotary embeddings, RMSNorm, LoRA, the gated MLP, the embedding lookup
and the output projection. Every parameter is created with logical axis names (param_init) that
grpo_jax.parallel.partitioning maps onto the mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.parallel import partitioning


Array = jax.Array


def rope_inv_freq(cfg: architecture.ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with linear or Llama-3 scaling as in transformers."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_sin_cos(cfg: architecture.ModelConfig, positions: Array) -> tuple[Array, Array]:
    """sin, cos [batch, seq, head_dim // 2] in float32 for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate x [batch, seq, heads, head_dim] in the half-split ("rotate_half") layout of HF."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def param_init(axes: tuple[str, ...], init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any
    offset: bool = False  # Gemma: scale by (1 + w) in float32, w initialised at 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", param_init(("norm",), init), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def norm(cfg: architecture.ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.gemma_norms, name=name)


class LoRA(nn.Module):
    """The low-rank update of a projection (Hu et al. 2021, eq. 3): x [..., *in] -> (x A) B * alpha / r
    [..., *out], A [*in, r] uniform in +-1/sqrt(fan_in) and B [r, *out] zero at the start (PEFT's
    init: the update is exactly zero until B moves)."""

    cfg: architecture.ModelConfig
    in_axes: tuple[str, ...]  # logical axes of the input dims the projection contracts
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, n = self.cfg, len(self.in_axes)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        bound = math.prod(x.shape[-n:]) ** -0.5
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        a = self.param("a", param_init((*self.in_axes, None), uniform), (*x.shape[-n:], cfg.lora_rank), pdt)
        b = self.param("b", param_init((None, *self.out_axes), nn.initializers.zeros), (cfg.lora_rank, *self.out_shape), pdt)
        h = jnp.tensordot(x.astype(dt), a.astype(dt), axes=n)
        return jnp.tensordot(h, b.astype(dt), axes=1) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dt)


def adapted(cfg: architecture.ModelConfig, name: str, base: nn.Module, x: Array, in_axes, out_shape, out_axes) -> Array:
    """base(x), plus its LoRA update when `name` is one of the config's targets."""
    y = base(x)
    if cfg.lora_rank and name in cfg.lora_targets:
        y = y + LoRA(cfg, tuple(in_axes), tuple(out_shape), tuple(out_axes), name=f"{name}_lora")(x)
    return y


class MLP(nn.Module):
    cfg: architecture.ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def dense(name, x, features, axes):
            layer = nn.Dense(features, use_bias=cfg.mlp_bias, dtype=dt, param_dtype=pdt, name=name,
                             kernel_init=param_init(axes), bias_init=param_init(axes[1:], nn.initializers.zeros))
            return adapted(cfg, name, layer, x, axes[:1], (features,), axes[1:])

        act = activation(cfg)
        h = act(dense("gate_proj", x, cfg.intermediate_size, ("embed", "mlp")))
        h = h * dense("up_proj", x, cfg.intermediate_size, ("embed", "mlp"))
        h = partitioning.constrain(h, ("activation_batch", "activation_length", "activation_mlp"), self.mesh)
        return dense("down_proj", h, cfg.hidden_size, ("mlp", "embed"))


def activation(cfg: architecture.ModelConfig):
    return nn.silu if cfg.hidden_act == "silu" else functools.partial(nn.gelu, approximate=True)


def embed_lookup(table: Array, tokens: Array, mesh: Mesh | None) -> Array:
    """table[tokens]: rows of the embedding [vocab, d] for token ids [batch, seq] -> [batch, seq, d].

    On a mesh the table stays where it is stored (vocab over tensor, d over fsdp) and nothing of its
    size moves: each device looks up its d-slice of the ids of every device in its fsdp group (ids are
    all-gathered, a few KB), an all-to-all over fsdp then hands each device all of d for its own rows,
    and a vocab split over tensor is a masked lookup summed over tensor. The gradient is a scatter-add
    into the local shard. (XLA's own partitioning of the gather replicates the table or the result.)"""
    if mesh is None or mesh.size == 1:
        return jnp.take(table, tokens, axis=0)
    vocab_ax, embed_ax = partitioning.to_mesh_spec(("vocab", "embed"), table.shape, mesh)
    row_ax = partitioning.row_axes(tokens.shape[0], mesh)
    if embed_ax is not None and embed_ax not in partitioning.mesh_axes(row_ax):
        # rows not split over fsdp (a batch the mesh does not divide): gather the table's d
        table = partitioning.constrain(table, ("vocab", None), mesh)
        embed_ax = None
    rows_split_by_embed = embed_ax is not None

    def local(tab, ids):  # tab [V / tp, d / fsdp], ids [rows here, seq]
        if rows_split_by_embed:
            ids = jax.lax.all_gather(ids, embed_ax, axis=0, tiled=True)  # the fsdp group's rows
        if vocab_ax is None:
            x = jnp.take(tab, ids, axis=0)
        else:
            local, here = partitioning.shard_index(ids, vocab_ax, tab.shape[0])
            x = jax.lax.psum(jnp.where(here[..., None], jnp.take(tab, local, axis=0), 0), vocab_ax)
        if embed_ax is None:
            return x
        # [the group's rows, seq, d / fsdp] -> [my rows, seq, d]
        return jax.lax.all_to_all(x, embed_ax, split_axis=0, concat_axis=2, tiled=True)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=(P(vocab_ax, embed_ax), P(row_ax, None)),
                         out_specs=P(row_ax, None, None))(table, tokens)


def logits_from_hidden(head: Array, hidden: Array) -> Array:
    """hidden [..., d] @ head [d, vocab] -> float32 logits, accumulated in float32 even for bf16."""
    return jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
