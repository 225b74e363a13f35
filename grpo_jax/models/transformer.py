"""Decoder-only transformer for the Llama, Qwen2, Qwen3 (dense and MoE), Mistral and Gemma 3 (text)
families, in Flax Linen.

Everything callers jit is a pure function of an explicit parameter pytree:

    params = init_params(cfg, key)                     # or hf.load_hf(path)
    logits, _ = forward(params, cfg, tokens, mask)     # [batch, seq, vocab] float32
    cache = init_cache(cfg, batch, max_len)
    logits, cache = forward(params, cfg, prompt, prompt_mask, cache=cache)      # prefill
    logits, cache = forward(params, cfg, next_tok[:, None], None, cache=cache)  # decode

Layers are stacked on a leading `layers` axis and run with `nn.scan`, so compile time does not grow
with depth. Every parameter carries logical axis names (see `param_logical_axes`) that
`grpo_jax.parallel.partitioning` maps onto a (data, fsdp, expert, tensor) mesh.

KV cache layout (a plain dict, so it can be donated and sharded like any pytree):
    k, v:  [layers, batch, max_len, kv_heads, head_dim]  keys/values by cache slot
    mask:  [batch, max_len] bool                          which slots hold real tokens
    pos:   [batch] int32                                  next rotary position of each row
    index: [] int32                                       next slot to write (shared by all rows)
Prompts are left-padded, so every row writes its next token into the same slot; the per-row `pos`
keeps rotary positions right, and `mask` hides the padding slots from attention.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.models import attention
from grpo_jax.models import layers
from grpo_jax.models import moe
from grpo_jax.parallel import partitioning


Array = jax.Array


class Block(nn.Module):
    """Pre-norm decoder layer. Fits nn.scan: carry (x, kv_cache, layer, router_stats) -> (carry, None);
    router_stats [2, E] accumulates the MoE layers' load-balancing statistics (None without experts)."""

    cfg: architecture.ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, carry, sin, cos, attn_mask, index, seq_lengths, token_mask):
        x, kv_cache, layer, router_stats = carry
        cfg = self.cfg
        residual = lambda y: partitioning.constrain(y, partitioning.RESIDUAL, self.mesh)
        x = residual(x)
        h, kv_cache = attention.Attention(cfg, self.mesh, name="attn")(layers.norm(cfg, "attn_norm")(x), sin, cos, attn_mask,
                                                            kv_cache, layer, index, seq_lengths)
        if cfg.gemma_norms:
            h = layers.norm(cfg, "post_attn_norm")(h)
        x = residual(x + h)
        if cfg.num_experts:
            h, stats = moe.MoE(cfg, self.mesh, name="moe")(layers.norm(cfg, "mlp_norm")(x), token_mask)
            if stats is not None:
                router_stats = router_stats + stats
        else:
            h = layers.MLP(cfg, self.mesh, name="mlp")(layers.norm(cfg, "mlp_norm")(x))
        if cfg.gemma_norms:
            h = layers.norm(cfg, "post_mlp_norm")(h)
        x = residual(x + h)
        return (x, kv_cache, layer + 1, router_stats), None


class Transformer(nn.Module):
    """The decoder. With a mesh, activations are constrained by logical axis names
    (grpo_jax.parallel.partitioning): rows over data x fsdp, heads and MLP over tensor."""

    cfg: architecture.ModelConfig
    mesh: Mesh | None = None
    pin_weights: bool = True

    @nn.compact
    def __call__(self, tokens, positions, attn_mask, kv_cache, index, return_hidden, seq_lengths=None,
                 token_mask=None):
        """-> (logits or hidden states, kv_cache, router_stats [2, E] summed over layers, or None without
        experts or token_mask: the real tokens [B, T] to gather them over)."""
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        embed = self.param("embedding", layers.param_init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt)
        residual_dt = jnp.dtype(cfg.residual_dtype or cfg.dtype)  # the layers' outputs add onto x in this dtype
        x = layers.embed_lookup(embed, tokens, self.mesh)
        if cfg.embed_scale:  # Gemma: the scale rounded to the weights' dtype, as in transformers
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
        x = partitioning.constrain(x.astype(residual_dt), partitioning.RESIDUAL, self.mesh)
        # [rotation types, B, T, head_dim // 2]: the global rotation, and the local one if it differs
        sin, cos = layers.rope_sin_cos(cfg, positions)
        sin, cos = sin[None], cos[None]
        if cfg.rope_local_theta is not None:
            local_sin, local_cos = layers.rope_sin_cos(cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None), positions)
            sin, cos = jnp.stack([sin[0], local_sin]), jnp.stack([cos[0], local_cos])

        block = Block
        if self.pin_weights and self.mesh is not None and self.mesh.size > 1:
            # Pin each layer's weights to their stored (fsdp-split) layout inside the scan body: the
            # constraint's transpose then pins their gradients too, so the backward scan reduce-
            # scatters each layer's gradient and carries only this device's shard of it, instead of
            # all-reducing full-size gradient buffers.
            block = nn.map_variables(block, "params", trans_in_fn=functools.partial(_pin_layer, cfg=cfg, mesh=self.mesh),
                                     mutable=False)
        if cfg.remat != "none":
            block = nn.remat(block, policy=architecture.REMAT_POLICIES[cfg.remat], prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 6,
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.mesh, name="layers")
        stats = jnp.zeros((2, cfg.num_experts), jnp.float32) if cfg.num_experts and token_mask is not None else None
        (x, kv_cache, _, stats), _ = stack((x, kv_cache, jnp.zeros((), jnp.int32), stats), sin, cos, attn_mask,
                                            index, seq_lengths, token_mask)
        x = partitioning.constrain(layers.norm(cfg, "final_norm")(x), partitioning.RESIDUAL, self.mesh)
        if return_hidden:
            return x, kv_cache, stats
        if cfg.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", layers.param_init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
        logits = layers.logits_from_hidden(head, x)
        return partitioning.constrain(logits, ("activation_batch", "activation_length", "activation_vocab"),
                                      self.mesh), kv_cache, stats


@functools.lru_cache(maxsize=32)
def _layer_axes(cfg: architecture.ModelConfig) -> architecture.Params:
    """Logical axes of one layer's parameters (the stacked ones without their leading `layers`)."""
    stacked = param_logical_axes(cfg)["layers"]
    return jax.tree.map(lambda spec: tuple(spec)[1:], stacked, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _pin_layer(variables: architecture.Params, cfg: architecture.ModelConfig, mesh: Mesh) -> architecture.Params:
    """One layer's parameters in the compute dtype, constrained to their stored layout on `mesh`
    (map_variables' trans_in_fn). The cast comes first (every use casts anyway), so the weights are
    all-gathered in the compute dtype (bfloat16: half the bytes of float32 master weights) and
    their gradients reduced in it, as mixed-precision FSDP does (PyTorch FSDP's MixedPrecision with
    param_dtype = reduce_dtype = bfloat16); accumulation over micro-batches and the optimizer
    stay in the parameters' dtype."""
    pin = lambda x, names: partitioning.constrain(x.astype(cfg.dtype), names, mesh)
    return {"params": jax.tree.map(pin, dict(variables["params"]), _layer_axes(cfg))}


def output_head(params: architecture.Params, cfg: architecture.ModelConfig) -> Array:
    """The unembedding matrix [d, vocab] (the transposed embedding when tied)."""
    return params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


def positions_from_mask(mask: Array) -> Array:
    """Rotary positions [batch, seq] of left- or right-padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(cfg: architecture.ModelConfig, key: Array) -> architecture.Params:
    """Randomly initialised parameters (plain arrays; logical axes come from `param_logical_axes`)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(key, tokens, tokens, jnp.ones((1, 1, 1), bool), None, 0, False)
    return nn.unbox(variables["params"])


def param_shapes(cfg: architecture.ModelConfig) -> architecture.Params:
    """ShapeDtypeStructs of the parameters, computed without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_logical_axes(cfg: architecture.ModelConfig) -> architecture.Params:
    """A pytree like the parameters holding a PartitionSpec of logical axis names per parameter."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(
        jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool), None, 0, False))
    return nn.get_partition_spec(boxed)["params"]


def init_cache(cfg: architecture.ModelConfig, batch: int, max_len: int, dtype: Any = None) -> architecture.Cache:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + completion)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "pos": jnp.zeros((batch,), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _forward_front_aligned(params: architecture.Params, cfg: architecture.ModelConfig, tokens: Array, mask: Array, positions: Array,
                    return_hidden: bool, mesh: Mesh | None, pin_weights: bool,
                    router_stats: bool) -> tuple[Array, Array | None]:
    """Cache-free forward with each row's real tokens moved to its front, so that attention is causal
    plus a key length per row, the form fused kernels take (jax.nn.dot_product_attention); outputs
    are moved back to the input layout. Real tokens get exactly what the masked einsum gives them."""
    order = jnp.argsort(~mask, axis=1, stable=True)  # [B, T]: real tokens first, in their order
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)
    lengths = jnp.maximum(mask.sum(axis=1, dtype=jnp.int32), 1)  # an all-padding row: no all-masked rows
    out, _, stats = Transformer(cfg, mesh, pin_weights).apply(
        {"params": params}, take(tokens, order), take(positions, order), None, None, 0, return_hidden, lengths,
        take(mask, order) if router_stats else None)
    return take(out, jnp.argsort(order, axis=1)[..., None]), stats


def _prefix_sharing_mask(cfg: architecture.ModelConfig, prefix_sharing: tuple[Array, Array],
                         positions: Array | None) -> tuple[Array, tuple]:
    """The attention mask of packed rows and its logical axes: [B, T, T], or [2, B, T, T] (full,
    window) when some layers attend within a sliding window measured in rotary positions."""
    if cfg.attention == "cudnn":
        raise ValueError("model.attention='cudnn' cannot take the prefix-sharing mask of packed rows (its "
                         "kernel reads segment lengths, not a mask): set model.attention='xla' or 'einsum', "
                         "or grpo.packing=False")
    if positions is None:
        raise ValueError("packed rows (prefix_sharing) need their rotary positions")
    attn_mask = attention.prefix_sharing_mask(*prefix_sharing)
    if not any(cfg.sliding_layers):
        return attn_mask, ("activation_batch", None, None)
    window = attn_mask & attention.window_mask(positions, cfg.sliding_window)
    return jnp.stack([attn_mask, window]), (None, "activation_batch", None, None)


def kv_cache_bytes_per_token(cfg: architecture.ModelConfig) -> int:
    """Bytes of KV cache one token takes (keys and values of every layer, in the compute dtype)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def forward(
    params: architecture.Params,
    cfg: architecture.ModelConfig,
    tokens: Array,
    mask: Array | None = None,
    cache: architecture.Cache | None = None,
    *,
    positions: Array | None = None,
    return_hidden: bool = False,
    mesh: Mesh | None = None,
    pin_weights: bool = True,
    router_loss: bool = False,
    kv_len: int | None = None,
    prefix_sharing: tuple[Array, Array] | None = None,
) -> tuple[Array, architecture.Cache | None] | tuple[Array, architecture.Cache | None, Array]:
    """Run the decoder on tokens [batch, seq].

    Args:
      params: parameter pytree (from init_params or hf.load_hf).
      cfg: the model config (static under jit).
      tokens: int token ids [batch, seq].
      mask: bool [batch, seq], True for real tokens (False for padding); None means all real.
      cache: a KV cache from init_cache; the tokens are written at slots [index, index + seq).
      positions: rotary positions [batch, seq]; by default counted from the mask (and from the
        cache's per-row `pos` when decoding).
      return_hidden: return final-norm hidden states [batch, seq, d] instead of logits.
      mesh: the (data, fsdp, expert, tensor) mesh the parameters live on (static under jit); activations are
        then constrained to it (grpo_jax.parallel.partitioning), so fsdp splits the batch, not d_model.
      pin_weights: with a mesh, hold each layer's weights to the training layout inside the layer
        scan (so their gradients are reduce-scattered per layer); False uses the weights wherever
        they are, e.g. the sampler's inference copy, which must not be gathered per token.
      router_loss: also return the MoE routers' load-balancing loss over the real tokens
        (`router_balance_loss`; 0 for a dense model).
      kv_len: with a cache, attend over its first kv_len slots only (static; the caller guarantees
        that index + seq <= kv_len): the sampler's decode segments read the filled prefix.
      prefix_sharing: (pieces, members) [batch, seq] int32 of packed rows (grpo_jax.rl.packing):
        attention.prefix_sharing_mask instead of a causal mask, windows measured in `positions`
        (required). attention "einsum" and "xla" compute it exactly; "cudnn" is refused.

    Returns:
      (logits [batch, seq, vocab] float32, or hidden states; the updated cache or None), and the
      load-balancing loss [] when router_loss.
    """
    B, T = tokens.shape
    mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    offsets = positions_from_mask(mask)
    if cache is None:
        _check_positions(T if positions is None else positions, cfg)
        if prefix_sharing is not None:
            attn_mask, spec = _prefix_sharing_mask(cfg, prefix_sharing, positions)
        else:
            positions = offsets if positions is None else positions
            causal = jnp.tril(jnp.ones((T, T), bool))
            attn_mask, spec = causal[None] & mask[:, None, :], ("activation_batch", None, None)
        if prefix_sharing is None and cfg.attention != "einsum":
            out, stats = _forward_front_aligned(params, cfg, tokens, mask, positions, return_hidden, mesh, pin_weights,
                                                router_loss)
        else:
            out, _, stats = Transformer(cfg, mesh, pin_weights).apply(
                {"params": params}, tokens, positions, partitioning.constrain(attn_mask, spec, mesh), None, 0,
                return_hidden, None, mask if router_loss else None)
        if router_loss:
            return out, None, moe.router_balance_loss(stats, mask.sum(), cfg)
        return out, None

    index = cache["index"]
    S = cache["mask"].shape[1]
    if positions is None:
        positions = cache["pos"][:, None] + offsets
    K = S if kv_len is None else min(kv_len, S)  # the slots attention reads
    _check_room(index, T, K, positions, cfg)
    key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))  # [B, S]
    causal = jnp.arange(K)[None, :] <= (index + jnp.arange(T))[:, None]  # [T, K]
    attn_mask = partitioning.constrain(causal[None] & key_mask[:, None, :K], ("activation_batch", None, None), mesh)
    out, (k, v), stats = Transformer(cfg, mesh, pin_weights).apply(
        {"params": params}, tokens, positions, attn_mask, (cache["k"], cache["v"]), index, return_hidden, None,
        mask if router_loss else None)
    new_cache = {
        "k": k,
        "v": v,
        "mask": key_mask,
        "pos": cache["pos"] + mask.sum(axis=-1, dtype=jnp.int32),
        "index": index + T,
    }
    if router_loss:
        return out, new_cache, moe.router_balance_loss(stats, mask.sum(), cfg)
    return out, new_cache


def _concrete(x) -> np.ndarray | None:
    """x as a numpy value when it is known outside of tracing, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_room(index: Array, T: int, S: int, positions: Array, cfg: architecture.ModelConfig) -> None:
    """Refuse a write past the cache's S slots, and rotary positions past the model's range: XLA
    would clamp the write (overwriting the last slots) and return wrong logits without an error.
    Checked statically (T > S) and, when they are concrete (eager calls), against index and
    positions; the sampler sizes its caches so that traced values cannot overflow."""
    if T > S:
        raise ValueError(f"{T} tokens do not fit a KV cache of {S} slots; init_cache(cfg, batch, max_len) "
                         f"with max_len >= prompt + completion length")
    idx = _concrete(index)
    if idx is not None and int(idx) + T > S:
        raise ValueError(f"writing {T} tokens at slot {int(idx)} runs past the KV cache's {S} slots")
    _check_positions(positions, cfg)


def _check_positions(positions: Array | int, cfg: architecture.ModelConfig) -> None:
    """Refuse rotary positions past max_position_embeddings (the model was never trained there; the
    logits would be silently wrong): `positions` itself when concrete (eager calls), or a sequence
    length whose default positions are 0..T-1 (checked at trace time)."""
    if isinstance(positions, int):
        pos = np.asarray([positions - 1]) if positions else None
    else:
        pos = _concrete(positions)
    if pos is not None and pos.size and int(pos.max()) >= cfg.max_position_embeddings:
        raise ValueError(f"rotary position {int(pos.max())} is past the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
