"""Grouped-query self-attention with rotary positions, optional q/k norms, sliding windows and a
stacked KV cache (Llama, Qwen2/3, Mistral, Gemma 3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.models import layers
from grpo_jax.parallel import partitioning


# A finite "minus infinity": a query whose keys are all masked (a padding slot) then gets a uniform
# average instead of NaNs that would poison gradients through jnp.where.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def prefix_sharing_mask(pieces: jax.Array, members: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t sees key s of a packed row (grpo_jax.rl.packing) iff s <= t, both
    belong to the same piece (pieces > 0), and s is on the piece's prompt (members 0) or on the
    query's own completion. Every token also sees itself, so empty positions attend to something
    (no all-masked rows, whose softmax would be NaN in some kernels).

    pieces, members: [B, T] int32."""
    T = pieces.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    same_piece = (pieces[:, :, None] == pieces[:, None, :]) & (pieces[:, None, :] > 0)
    own = (members[:, None, :] == 0) | (members[:, None, :] == members[:, :, None])
    return (causal[None] & same_piece & own) | jnp.eye(T, dtype=bool)[None]


def window_mask(positions: jax.Array, window: int) -> jax.Array:
    """[B, T, T] bool: key s is within `window` rotary positions of query t (positions [B, T]). In a
    packed row a completion's tokens are not next to its prompt's, so the window is a distance
    between positions, not slots."""
    return positions[:, :, None] - positions[:, None, :] < window


class Attention(nn.Module):
    cfg: architecture.ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, sin, cos, attn_mask, kv_cache, layer, index, seq_lengths):
        """x [B, T, d]; attn_mask [B, T, S] bool, or [2, B, T, S] (the mask of full-attention layers
        and of sliding-window ones, for packed rows: forward's `prefix_sharing`); kv_cache (k, v)
        [layers, B, S, Hkv, D] or None.

        With seq_lengths [B] (and attn_mask None) the rows' real tokens are at their front, attention
        is causal within each row's first seq_lengths tokens, and jax.nn.dot_product_attention
        computes it. Without a cache, with attn_mask and attention="xla" (packed rows),
        jax.nn.dot_product_attention takes the mask itself.

        The whole stacked cache travels through the layer scan as loop state and each layer writes its
        new keys/values into it with dynamic_update_slice: XLA updates a loop-carried buffer in place,
        whereas a per-layer cache scanned in and out would be copied whole at every decode step.
        """
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name, heads, heads_axis):
            dense = nn.DenseGeneral(
                (heads, D), axis=-1, use_bias=cfg.qkv_bias, dtype=dt, param_dtype=pdt, name=name,
                kernel_init=layers.param_init(("embed", heads_axis, "head_dim")),
                bias_init=layers.param_init((heads_axis, "head_dim"), nn.initializers.zeros))
            return layers.adapted(cfg, name, dense, x, ("embed",), (heads, D), (heads_axis, "head_dim"))

        heads = lambda y, axis: partitioning.constrain(
            y, ("activation_batch", "activation_length", axis, None), self.mesh)
        q, k = proj("q_proj", H, "heads"), proj("k_proj", K, "kv_heads")
        if cfg.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm before the rotation
            q, k = layers.norm(cfg, "q_norm")(q), layers.norm(cfg, "k_norm")(k)
        sliding = cfg.sliding_layers
        # Whether this layer attends within the window, traced: the layer index is the scan's state.
        windowed = jnp.asarray(sliding)[layer]
        if sin.shape[0] == 2:  # [global, local] rotations (Gemma 3): the window's layers use the local one
            sin, cos = sin[windowed.astype(jnp.int32)], cos[windowed.astype(jnp.int32)]
        else:
            sin, cos = sin[0], cos[0]
        q = heads(layers.apply_rope(q, sin, cos), "activation_heads")
        k = heads(layers.apply_rope(k, sin, cos), "activation_kv_heads")
        v = heads(proj("v_proj", K, "kv_heads"), "activation_kv_heads")

        if kv_cache is not None:
            ck, cv = kv_cache
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, index, 0, 0))
            kv_cache = (ck, cv)
            # Attend over the first attn_mask.shape[-1] slots only (forward's kv_len): the cost of a
            # decode step follows the filled part of the cache, not its size.
            kv_len = attn_mask.shape[-1]
            k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)[:, :kv_len]
            v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)[:, :kv_len]

        B, T = x.shape[:2]
        scale = (cfg.query_pre_attn_scalar or D) ** -0.5
        windows_given = attn_mask is not None and attn_mask.ndim == 4  # [full, window] masks of packed rows
        if windows_given:
            attn_mask = jnp.where(windowed, attn_mask[1], attn_mask[0])
        if attn_mask is not None and kv_cache is None and cfg.attention == "xla":
            out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask[:, None], scale=scale, implementation="xla")
        elif seq_lengths is not None:
            # Padded queries (beyond a row's length) still see its real keys: no all-masked rows.
            attend = lambda window: jax.nn.dot_product_attention(  # noqa: E731
                q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=seq_lengths, implementation=cfg.attention,
                local_window_size=None if window is None else (window - 1, 0))
            if not any(sliding):
                out = attend(None)
            elif all(sliding):
                out = attend(cfg.sliding_window)
            else:
                out = jax.lax.cond(windowed, lambda: attend(cfg.sliding_window), lambda: attend(None))
        else:
            if any(sliding) and not windows_given:
                # Slots and rotary positions advance together after a row's left padding, so the
                # window is a distance between slots: query slot index + t sees slots > it - window.
                S = attn_mask.shape[-1]
                near = jnp.arange(S)[None, :] > (index + jnp.arange(T))[:, None] - cfg.sliding_window
                attn_mask = attn_mask & (near[None] | ~windowed)
            # Grouped-query attention without repeating K/V: query heads are split [kv_heads, group].
            q = q.reshape(B, T, K, H // K, D)
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt), preferred_element_type=jnp.float32)
            scores = scores * scale
            scores = jnp.where(attn_mask[:, None, None], scores, _MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt)).reshape(B, T, H, D)
        out = heads(out, "activation_heads")
        o_proj = nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=cfg.o_bias, dtype=dt, param_dtype=pdt, name="o_proj",
            kernel_init=layers.param_init(("heads", "head_dim", "embed")),
            bias_init=layers.param_init(("embed",), nn.initializers.zeros))
        out = layers.adapted(cfg, "o_proj", o_proj, out, ("heads", "head_dim"), (cfg.hidden_size,), ("embed",))
        return out, kv_cache
