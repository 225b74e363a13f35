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
`grpo_jax.sharding` maps onto a (data, fsdp, expert, tensor) mesh.

KV cache layout (a plain dict, so it can be donated and sharded like any pytree):
    k, v:  [layers, batch, max_len, kv_heads, head_dim]  keys/values by cache slot
    mask:  [batch, max_len] bool                          which slots hold real tokens
    pos:   [batch] int32                                  next rotary position of each row
    index: [] int32                                       next slot to write (shared by all rows)
Prompts are left-padded, so every row writes its next token into the same slot; the per-row `pos`
keeps rotary positions right, and `mask` hides the padding slots from attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax import partitioning

Array = jax.Array
Params = Any  # nested dict of arrays
Cache = dict[str, Array]

# A finite "minus infinity": a query whose keys are all masked (a padding slot) then gets a uniform
# average instead of NaNs that would poison gradients through jnp.where.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_ATTENTION = ("einsum", "xla", "cudnn")


# The projections LoRA can adapt (PEFT's target_modules names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama/Qwen2-style decoder. Frozen and hashable: pass it as a static
    argument to jit."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Rotary scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...);
    # None means plain RoPE. Kept as a tuple so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False  # Qwen2: True
    # Qwen3: RMSNorm of each head's queries and keys (over head_dim, weights shared by the heads)
    # before the rotary embedding.
    qk_norm: bool = False
    # Sliding-window attention (Mistral; Qwen2/Qwen3 with use_sliding_window): a query sees the last
    # `sliding_window` tokens, itself included, on the layers whose `layer_types` entry is
    # "sliding_attention" (None: every layer).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # Gemma 3: RMSNorms scale by (1 + w) and also follow attention and the MLP; embeddings are scaled
    # by sqrt(hidden_size); a GeLU-tanh MLP; scores scaled by query_pre_attn_scalar**-0.5; the
    # sliding-window layers rotate with their own base rope_local_theta (no scaling).
    gemma_norms: bool = False
    embed_scale: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    # Mixture of experts (Qwen3-MoE; num_experts > 0): every layer's MLP is `num_experts` SwiGLU experts
    # of width moe_intermediate_size, of which each token uses the top `num_experts_per_tok` by
    # softmax router probability, weighted by those probabilities (renormalised to sum to 1 with
    # norm_topk_prob). moe_impl: "ragged" groups the tokens by expert and runs jax.lax.ragged_dot
    # (a grouped matmul on TPU and GPU); "dense" runs every expert on every token and weights the
    # outputs (num_experts / num_experts_per_tok times the FLOPs, but plain dots: faster where
    # ragged_dot is expanded into dense ones anyway, as on CPU); "auto": dense on CPU, else ragged.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_impl: str = "auto"
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    architecture: str = "llama"  # "llama" | "qwen2" | "qwen3": the HF model_type save_hf writes
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    # The residual stream between layers (None: the compute dtype). "float32" with bfloat16 compute
    # keeps the running sum of the layers' outputs unrounded: the sampler's and the trainer's
    # log-probabilities then differ by a third less (scripts/bench_mismatch.py), for twice the
    # memory of the residual activations (the remat checkpoints).
    residual_dtype: str | None = None
    remat: str = "none"  # "none" | "full" | "dots": activation checkpointing of each layer
    # Attention of cache-free passes (training, reference and old log-probabilities): "einsum" (scores
    # [B, H, T, S] in memory, any mask), or jax.nn.dot_product_attention over rows packed to the left,
    # with implementation "xla" or "cudnn" (fused flash attention, no [T, S] buffers; bf16/fp16 GPUs).
    # Decoding with a KV cache always uses "einsum".
    attention: str = "einsum"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # the checkpoint's EOS ids; the sampler stops on these
    # LoRA (Hu et al. 2021): each projection named in lora_targets adds (x A) B * lora_alpha / lora_rank
    # to its output, A [in, r] and B [r, out] living next to its kernel as `<name>_lora` {a, b}.
    # 0: no adapters. A model run with lora_rank=0 ignores adapters in its parameters: the base model.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(_REMAT_POLICIES)}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"attention={self.attention!r}; expected one of {list(_ATTENTION)}")
        if self.residual_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"residual_dtype={self.residual_dtype!r}; expected None (the compute dtype), "
                             "'float32', 'bfloat16' or 'float16'")
        if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got dtype={self.dtype!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (None: full attention)")
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers or set(self.layer_types)
                                             - {"full_attention", "sliding_attention"}):
            raise ValueError(f"layer_types={self.layer_types}: expected {self.num_layers} entries of "
                             "'full_attention' or 'sliding_attention'")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected 'silu' or 'gelu_tanh'")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0):
            raise ValueError(f"num_experts={self.num_experts} needs 0 < num_experts_per_tok <= num_experts "
                             f"(got {self.num_experts_per_tok}) and moe_intermediate_size > 0 "
                             f"(got {self.moe_intermediate_size})")
        if self.moe_impl not in ("auto", "ragged", "dense"):
            raise ValueError(f"moe_impl={self.moe_impl!r}; expected 'auto', 'ragged' or 'dense'")
        targets = set(self.lora_targets)
        if self.lora_rank < 0 or not targets <= set(LORA_TARGETS) or (self.lora_rank and not targets):
            raise ValueError(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets}: expected rank >= 0 "
                             f"and a non-empty subset of {LORA_TARGETS}")
        if self.lora_rank and self.num_experts and targets & {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"lora_targets={self.lora_targets}: adapters on the experts of a mixture-of-experts "
                             "model are not supported; target the attention projections (q_proj, k_proj, "
                             "v_proj, o_proj)")
        rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_type={rope_type!r} is not supported; expected 'default', 'linear' or 'llama3'")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types or ("sliding_attention",) * self.num_layers)

    @property
    def num_params(self) -> int:
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        attn += 2 * d if self.gemma_norms else 0  # the post-attention and post-MLP norms
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        if self.num_experts:  # the router and every expert
            mlp = d * self.num_experts + 3 * d * self.moe_intermediate_size * self.num_experts
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + L * (attn + mlp + 2 * d) + d + head


# Shapes of the models people run GRPO on (weights are not included; use hf.load_hf for those).
def _shape(vocab, d, ff, layers, heads, kv_heads, head_dim, theta, eps, arch, tied, **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=theta,
                       rms_norm_eps=eps, architecture=arch, qkv_bias=arch == "qwen2",
                       tie_word_embeddings=tied, **kw)


_LLAMA3_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))

SHAPES: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _shape(151936, 896, 4864, 24, 14, 2, 64, 1e6, 1e-6, "qwen2", True),
    "qwen2.5-1.5b": _shape(151936, 1536, 8960, 28, 12, 2, 128, 1e6, 1e-6, "qwen2", True),
    "qwen2.5-7b": _shape(152064, 3584, 18944, 28, 28, 4, 128, 1e6, 1e-6, "qwen2", False),
    "llama-3.2-1b": _shape(128256, 2048, 8192, 16, 32, 8, 64, 5e5, 1e-5, "llama", True,
                           rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072),
    "qwen3-0.6b": _shape(151936, 1024, 3072, 28, 16, 8, 128, 1e6, 1e-6, "qwen3", True, qk_norm=True,
                         max_position_embeddings=40960),
    "qwen3-1.7b": _shape(151936, 2048, 6144, 28, 16, 8, 128, 1e6, 1e-6, "qwen3", True, qk_norm=True,
                         max_position_embeddings=40960),
    "qwen3-4b": _shape(151936, 2560, 9728, 36, 32, 8, 128, 1e6, 1e-6, "qwen3", True, qk_norm=True,
                       max_position_embeddings=40960),
    "qwen3-8b": _shape(151936, 4096, 12288, 36, 32, 8, 128, 1e6, 1e-6, "qwen3", False, qk_norm=True,
                       max_position_embeddings=40960),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 per token (3.3B of the 30.5B parameters active).
    "qwen3-30b-a3b": _shape(151936, 2048, 6144, 48, 32, 4, 128, 1e6, 1e-6, "qwen3_moe", False, qk_norm=True,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                            norm_topk_prob=True, max_position_embeddings=40960),
    "mistral-7b": _shape(32000, 4096, 14336, 32, 32, 8, 128, 1e4, 1e-5, "mistral", False, sliding_window=4096),
    "gemma-3-1b": _shape(262144, 1152, 6912, 26, 4, 1, 256, 1e6, 1e-6, "gemma3_text", True, qk_norm=True,
                         gemma_norms=True, embed_scale=True, hidden_act="gelu_tanh", query_pre_attn_scalar=256.0,
                         rope_local_theta=1e4, sliding_window=512, max_position_embeddings=32768,
                         layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                           for i in range(26))),
    "smollm2-135m": _shape(49152, 576, 1536, 30, 9, 3, 64, 1e5, 1e-5, "llama", True,
                           max_position_embeddings=8192),
    # For CPU tests and smoke runs.
    "tiny": _shape(512, 64, 128, 2, 4, 2, 16, 1e4, 1e-6, "qwen2", True, max_position_embeddings=2048),
    "tiny-moe": _shape(512, 64, 128, 2, 4, 2, 16, 1e4, 1e-6, "qwen3_moe", True, qk_norm=True, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       max_position_embeddings=2048),
}


# --------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
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


def rope_sin_cos(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """sin, cos [batch, seq, head_dim // 2] in float32 for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate x [batch, seq, heads, head_dim] in the half-split ("rotate_half") layout of HF."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Modules


def _init(axes: tuple[str, ...], init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any
    offset: bool = False  # Gemma: scale by (1 + w) in float32, w initialised at 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", _init(("norm",), init), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.gemma_norms, name=name)


class LoRA(nn.Module):
    """The low-rank update of a projection (Hu et al. 2021, eq. 3): x [..., *in] -> (x A) B * alpha / r
    [..., *out], A [*in, r] uniform in +-1/sqrt(fan_in) and B [r, *out] zero at the start (PEFT's
    init: the update is exactly zero until B moves)."""

    cfg: ModelConfig
    in_axes: tuple[str, ...]  # logical axes of the input dims the projection contracts
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, n = self.cfg, len(self.in_axes)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        bound = math.prod(x.shape[-n:]) ** -0.5
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        a = self.param("a", _init((*self.in_axes, None), uniform), (*x.shape[-n:], cfg.lora_rank), pdt)
        b = self.param("b", _init((None, *self.out_axes), nn.initializers.zeros), (cfg.lora_rank, *self.out_shape), pdt)
        h = jnp.tensordot(x.astype(dt), a.astype(dt), axes=n)
        return jnp.tensordot(h, b.astype(dt), axes=1) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dt)


def _adapted(cfg: ModelConfig, name: str, base: nn.Module, x: Array, in_axes, out_shape, out_axes) -> Array:
    """base(x), plus its LoRA update when `name` is one of the config's targets."""
    y = base(x)
    if cfg.lora_rank and name in cfg.lora_targets:
        y = y + LoRA(cfg, tuple(in_axes), tuple(out_shape), tuple(out_axes), name=f"{name}_lora")(x)
    return y


class Attention(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, sin, cos, attn_mask, kv_cache, layer, index, seq_lengths):
        """x [B, T, d]; attn_mask [B, T, S] bool; kv_cache (k, v) [layers, B, S, Hkv, D] or None.

        With seq_lengths [B] (and attn_mask None) the rows are packed to the left, attention is causal
        within each row's first seq_lengths tokens, and jax.nn.dot_product_attention computes it.

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
                kernel_init=_init(("embed", heads_axis, "head_dim")),
                bias_init=_init((heads_axis, "head_dim"), nn.initializers.zeros))
            return _adapted(cfg, name, dense, x, ("embed",), (heads, D), (heads_axis, "head_dim"))

        heads = lambda y, axis: partitioning.constrain(
            y, ("activation_batch", "activation_length", axis, None), self.mesh)
        q, k = proj("q_proj", H, "heads"), proj("k_proj", K, "kv_heads")
        if cfg.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm before the rotation
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        sliding = cfg.sliding_layers
        # Whether this layer attends within the window, traced: the layer index is the scan's state.
        windowed = jnp.asarray(sliding)[layer]
        if sin.shape[0] == 2:  # [global, local] rotations (Gemma 3): the window's layers use the local one
            sin, cos = sin[windowed.astype(jnp.int32)], cos[windowed.astype(jnp.int32)]
        else:
            sin, cos = sin[0], cos[0]
        q = heads(apply_rope(q, sin, cos), "activation_heads")
        k = heads(apply_rope(k, sin, cos), "activation_kv_heads")
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
        if seq_lengths is not None:
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
            if any(sliding):
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
            kernel_init=_init(("heads", "head_dim", "embed")),
            bias_init=_init(("embed",), nn.initializers.zeros))
        out = _adapted(cfg, "o_proj", o_proj, out, ("heads", "head_dim"), (cfg.hidden_size,), ("embed",))
        return out, kv_cache


class MLP(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def dense(name, x, features, axes):
            layer = nn.Dense(features, use_bias=cfg.mlp_bias, dtype=dt, param_dtype=pdt, name=name,
                             kernel_init=_init(axes), bias_init=_init(axes[1:], nn.initializers.zeros))
            return _adapted(cfg, name, layer, x, axes[:1], (features,), axes[1:])

        act = _activation(cfg)
        h = act(dense("gate_proj", x, cfg.intermediate_size, ("embed", "mlp")))
        h = h * dense("up_proj", x, cfg.intermediate_size, ("embed", "mlp"))
        h = partitioning.constrain(h, ("activation_batch", "activation_length", "activation_mlp"), self.mesh)
        return dense("down_proj", h, cfg.hidden_size, ("mlp", "embed"))


def _activation(cfg: ModelConfig):
    return nn.silu if cfg.hidden_act == "silu" else functools.partial(nn.gelu, approximate=True)


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Qwen3-MoE; Shazeer et al. 2017, GShard, Lepikhin et al. 2020):

        p = softmax(x W_router)                                  [tokens, E], float32
        e_1..e_k = the k largest p;  g_i = p_{e_i}  (/ Σ_j p_{e_j} with norm_topk_prob)
        y = Σ_i g_i · W_down[e_i] (silu(x W_gate[e_i]) ⊙ x W_up[e_i])

    Returns y [B, T, d] and the layer's load-balancing statistics [2, E] over the real tokens
    (`token_mask`): per expert, its number of top-k assignments and its summed router probability
    (None when token_mask is None: the sampler does not pay for them).

    On a mesh the experts are split over the `expert` axis and each expert's width over `tensor`
    (partitioning.RULES). Rows are split over expert too (it is a batch axis elsewhere), so each
    device gathers the rows of its expert group, runs its own experts on the tokens routed to them and
    reduce-scatters the sums back to their rows (Megatron-LM's all-gather token dispatcher): no
    expert's weights ever move between expert-axis devices.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: Array, token_mask: Array | None) -> tuple[Array, Array | None]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        E, k, d, ff = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
        router = self.param("router", _init(("embed", None)), (d, E), pdt)
        w_gate = self.param("gate_proj", _init(("expert", "embed", "mlp")), (E, d, ff), pdt)
        w_up = self.param("up_proj", _init(("expert", "embed", "mlp")), (E, d, ff), pdt)
        w_down = self.param("down_proj", _init(("expert", "mlp", "embed")), (E, ff, d), pdt)

        logits = jnp.einsum("btd,de->bte", x, router.astype(dt), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = _top_k(probs, k, self.mesh)  # [B, T, k]
        if cfg.norm_topk_prob:
            gates = gates / gates.sum(-1, keepdims=True)

        stats = None
        if token_mask is not None:  # sums over the rows (a one-hot contraction, not a scatter: rows stay split)
            real = token_mask.astype(jnp.float32)
            counts = jnp.einsum("btke,bt->e", jax.nn.one_hot(experts, E, dtype=jnp.float32), real)
            stats = jnp.stack([counts, jnp.einsum("bte,bt->e", probs, real)])

        y = _experts(x, experts, gates.astype(dt), *(w.astype(dt) for w in (w_gate, w_up, w_down)), cfg, self.mesh)
        return y, stats


def _top_k(probs: Array, k: int, mesh: Mesh | None) -> tuple[Array, Array]:
    """lax.top_k over the last axis, on each device's own rows: XLA's partitioner would otherwise
    all-gather the whole batch's [B, T, E] probabilities for the top-k custom call."""
    if mesh is None or mesh.size == 1:
        return jax.lax.top_k(probs, k)
    rows = partitioning.to_mesh_spec(("activation_batch",), probs.shape[:1], mesh)[0]
    P = jax.sharding.PartitionSpec
    return jax.shard_map(lambda p: tuple(jax.lax.top_k(p, k)), mesh=mesh, in_specs=P(rows),
                         out_specs=(P(rows), P(rows)))(probs)


def _expert_mix(x: Array, experts: Array, gates: Array, w_gate: Array, w_up: Array, w_down: Array, first: Array,
                impl: str, act) -> Array:
    """Σ_i gates_i · expert_{experts_i}(x) over the experts held here, [first, first + E_here).

    x [B, T, d]; experts, gates [B, T, k]; w_gate, w_up [E_here, d, f]; w_down [E_here, f, d].
    Assignments to experts held elsewhere contribute nothing (another device adds them)."""
    B, T, d = x.shape
    k, here = experts.shape[-1], w_gate.shape[0]
    x = x.reshape(-1, d)
    local = experts.reshape(-1, k) - first  # [N, k]; outside [0, here): held elsewhere
    gates = gates.reshape(-1, k)
    if impl == "dense":
        weight = (jax.nn.one_hot(local, here, dtype=gates.dtype) * gates[..., None]).sum(1)  # [N, E_here]
        h = act(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
        return jnp.einsum("nef,efd,ne->nd", h, w_down, weight).reshape(B, T, d)
    flat = local.reshape(-1)
    group = jnp.where((flat >= 0) & (flat < here), flat, here)  # held elsewhere: sorted to the end
    order = jnp.argsort(group, stable=True)  # [N k]: assignments grouped by expert
    sizes = jnp.zeros((here + 1,), jnp.int32).at[group].add(1)[:here]
    token = order // k
    xs = x[token]
    h = act(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    ys = jax.lax.ragged_dot(h, w_down, sizes)  # rows past the groups (held elsewhere) are 0
    ys = ys * gates.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(ys).reshape(B, T, d)


def _experts(x, experts, gates, w_gate, w_up, w_down, cfg: ModelConfig, mesh: Mesh | None) -> Array:
    """The experts' weighted sum for every token, partitioned over `mesh` (see MoE)."""
    impl = cfg.moe_impl
    if impl == "auto":
        impl = "dense" if jax.default_backend() == "cpu" else "ragged"
    mix = functools.partial(_expert_mix, impl=impl, act=_activation(cfg))
    if mesh is None or mesh.size == 1:
        return mix(x, experts, gates, w_gate, w_up, w_down, 0)
    rows = partitioning.to_mesh_spec(("activation_batch",), x.shape[:1], mesh)[0]
    ex, _, ff = partitioning.to_mesh_spec(("expert", None, "mlp"), w_gate.shape, mesh)
    gather = ex is not None and ex in partitioning.mesh_axes(rows)

    def local(x, experts, gates, w_gate, w_up, w_down):
        if gather:  # the expert group's rows: every token that may be routed to the experts here
            x, experts, gates = (jax.lax.all_gather(a, ex, axis=0, tiled=True) for a in (x, experts, gates))
        first = 0 if ex is None else jax.lax.axis_index(ex) * w_gate.shape[0]
        y = mix(x, experts, gates, w_gate, w_up, w_down, first)
        if ff is not None:
            y = jax.lax.psum(y, ff)
        if ex is not None:
            y = jax.lax.psum_scatter(y, ex, scatter_dimension=0, tiled=True) if gather else jax.lax.psum(y, ex)
        return y

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows),) * 3 + (P(ex, None, ff),) * 2 + (P(ex, ff, None),),
                         out_specs=P(rows))(x, experts, gates, w_gate, w_up, w_down)


class Block(nn.Module):
    """Pre-norm decoder layer. Fits nn.scan: carry (x, kv_cache, layer, router_stats) -> (carry, None);
    router_stats [2, E] accumulates the MoE layers' load-balancing statistics (None without experts)."""

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, carry, sin, cos, attn_mask, index, seq_lengths, token_mask):
        x, kv_cache, layer, router_stats = carry
        cfg = self.cfg
        residual = lambda y: partitioning.constrain(y, partitioning.RESIDUAL, self.mesh)
        x = residual(x)
        h, kv_cache = Attention(cfg, self.mesh, name="attn")(_norm(cfg, "attn_norm")(x), sin, cos, attn_mask,
                                                            kv_cache, layer, index, seq_lengths)
        if cfg.gemma_norms:
            h = _norm(cfg, "post_attn_norm")(h)
        x = residual(x + h)
        if cfg.num_experts:
            h, stats = MoE(cfg, self.mesh, name="moe")(_norm(cfg, "mlp_norm")(x), token_mask)
            if stats is not None:
                router_stats = router_stats + stats
        else:
            h = MLP(cfg, self.mesh, name="mlp")(_norm(cfg, "mlp_norm")(x))
        if cfg.gemma_norms:
            h = _norm(cfg, "post_mlp_norm")(h)
        x = residual(x + h)
        return (x, kv_cache, layer + 1, router_stats), None


class Transformer(nn.Module):
    """The decoder. With a mesh, activations are constrained by logical axis names
    (grpo_jax.partitioning): rows over data x fsdp, heads and MLP over tensor."""

    cfg: ModelConfig
    mesh: Mesh | None = None
    pin_weights: bool = True

    @nn.compact
    def __call__(self, tokens, positions, attn_mask, kv_cache, index, return_hidden, seq_lengths=None,
                 token_mask=None):
        """-> (logits or hidden states, kv_cache, router_stats [2, E] summed over layers, or None without
        experts or token_mask: the real tokens [B, T] to gather them over)."""
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        embed = self.param("embedding", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt)
        residual_dt = jnp.dtype(cfg.residual_dtype or cfg.dtype)  # the layers' outputs add onto x in this dtype
        x = embed_lookup(embed, tokens, self.mesh)
        if cfg.embed_scale:  # Gemma: the scale rounded to the weights' dtype, as in transformers
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
        x = partitioning.constrain(x.astype(residual_dt), partitioning.RESIDUAL, self.mesh)
        # [rotation types, B, T, head_dim // 2]: the global rotation, and the local one if it differs
        sin, cos = rope_sin_cos(cfg, positions)
        sin, cos = sin[None], cos[None]
        if cfg.rope_local_theta is not None:
            local_sin, local_cos = rope_sin_cos(cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None), positions)
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
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 6,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.mesh, name="layers")
        stats = jnp.zeros((2, cfg.num_experts), jnp.float32) if cfg.num_experts and token_mask is not None else None
        (x, kv_cache, _, stats), _ = layers((x, kv_cache, jnp.zeros((), jnp.int32), stats), sin, cos, attn_mask,
                                            index, seq_lengths, token_mask)
        x = partitioning.constrain(_norm(cfg, "final_norm")(x), partitioning.RESIDUAL, self.mesh)
        if return_hidden:
            return x, kv_cache, stats
        if cfg.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", _init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
        logits = logits_from_hidden(head, x)
        return partitioning.constrain(logits, ("activation_batch", "activation_length", "activation_vocab"),
                                      self.mesh), kv_cache, stats


@functools.lru_cache(maxsize=32)
def _layer_axes(cfg: ModelConfig) -> Params:
    """Logical axes of one layer's parameters (the stacked ones without their leading `layers`)."""
    stacked = param_logical_axes(cfg)["layers"]
    return jax.tree.map(lambda spec: tuple(spec)[1:], stacked, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _pin_layer(variables: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """One layer's parameters in the compute dtype, constrained to their stored layout on `mesh`
    (map_variables' trans_in_fn). The cast comes first (every use casts anyway), so the weights are
    all-gathered in the compute dtype (bfloat16: half the bytes of float32 master weights) and
    their gradients reduced in it, as mixed-precision FSDP does (PyTorch FSDP's MixedPrecision with
    param_dtype = reduce_dtype = bfloat16); accumulation over micro-batches and the optimizer
    stay in the parameters' dtype."""
    pin = lambda x, names: partitioning.constrain(x.astype(cfg.dtype), names, mesh)
    return {"params": jax.tree.map(pin, dict(variables["params"]), _layer_axes(cfg))}


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
    row_ax = partitioning.to_mesh_spec(("activation_batch", None), tokens.shape, mesh)[0]
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
            first = jax.lax.axis_index(vocab_ax) * tab.shape[0]
            here = (ids >= first) & (ids < first + tab.shape[0])
            x = jnp.take(tab, jnp.clip(ids - first, 0, tab.shape[0] - 1), axis=0)
            x = jax.lax.psum(jnp.where(here[..., None], x, 0), vocab_ax)
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


def output_head(params: Params, cfg: ModelConfig) -> Array:
    """The unembedding matrix [d, vocab] (the transposed embedding when tied)."""
    return params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


# --------------------------------------------------------------------------------------------------
# Pure functional API


def positions_from_mask(mask: Array) -> Array:
    """Rotary positions [batch, seq] of left- or right-padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(cfg: ModelConfig, key: Array) -> Params:
    """Randomly initialised parameters (plain arrays; logical axes come from `param_logical_axes`)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(key, tokens, tokens, jnp.ones((1, 1, 1), bool), None, 0, False)
    return nn.unbox(variables["params"])


def param_shapes(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of the parameters, computed without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_logical_axes(cfg: ModelConfig) -> Params:
    """A pytree like the parameters holding a PartitionSpec of logical axis names per parameter."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(
        jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool), None, 0, False))
    return nn.get_partition_spec(boxed)["params"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
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


def _forward_packed(params: Params, cfg: ModelConfig, tokens: Array, mask: Array, positions: Array,
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


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of KV cache one token takes (keys and values of every layer, in the compute dtype)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: Array,
    mask: Array | None = None,
    cache: Cache | None = None,
    *,
    positions: Array | None = None,
    return_hidden: bool = False,
    mesh: Mesh | None = None,
    pin_weights: bool = True,
    router_loss: bool = False,
    kv_len: int | None = None,
) -> tuple[Array, Cache | None] | tuple[Array, Cache | None, Array]:
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
        then constrained to it (grpo_jax.partitioning), so fsdp splits the batch, not d_model.
      pin_weights: with a mesh, hold each layer's weights to the training layout inside the layer
        scan (so their gradients are reduce-scattered per layer); False uses the weights wherever
        they are, e.g. the sampler's inference copy, which must not be gathered per token.
      router_loss: also return the MoE routers' load-balancing loss over the real tokens
        (`router_balance_loss`; 0 for a dense model).
      kv_len: with a cache, attend over its first kv_len slots only (static; the caller guarantees
        that index + seq <= kv_len): the sampler's decode segments read the filled prefix.

    Returns:
      (logits [batch, seq, vocab] float32, or hidden states; the updated cache or None), and the
      load-balancing loss [] when router_loss.
    """
    B, T = tokens.shape
    mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    offsets = positions_from_mask(mask)
    if cache is None:
        if positions is None:
            positions = offsets
        if cfg.attention != "einsum":
            out, stats = _forward_packed(params, cfg, tokens, mask, positions, return_hidden, mesh, pin_weights,
                                         router_loss)
        else:
            causal = jnp.tril(jnp.ones((T, T), bool))
            attn_mask = partitioning.constrain(causal[None] & mask[:, None, :], ("activation_batch", None, None), mesh)
            out, _, stats = Transformer(cfg, mesh, pin_weights).apply(
                {"params": params}, tokens, positions, attn_mask, None, 0, return_hidden, None,
                mask if router_loss else None)
        if router_loss:
            return out, None, router_balance_loss(stats, mask.sum(), cfg)
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
        return out, new_cache, router_balance_loss(stats, mask.sum(), cfg)
    return out, new_cache


def _concrete(x) -> np.ndarray | None:
    """x as a numpy value when it is known outside of tracing, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_room(index: Array, T: int, S: int, positions: Array, cfg: ModelConfig) -> None:
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
    pos = _concrete(positions)
    if pos is not None and pos.size and int(pos.max()) >= cfg.max_position_embeddings:
        raise ValueError(f"rotary position {int(pos.max())} is past the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")


def router_balance_loss(stats: Array | None, num_tokens: Array, cfg: ModelConfig) -> Array:
    """The Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4-6) over all MoE layers,
    as transformers' load_balancing_loss_func computes it for Qwen3-MoE:

        loss = E · Σ_e f_e · P_e,   f_e = (top-k assignments to e) / (L · tokens),
                                    P_e = (Σ router probability of e) / (L · tokens),

    the sums over every layer's real tokens. Minimal (k) when routing is uniform; the gradient flows
    through P. stats [2, E] are the layers' summed (assignments, probabilities); None: a dense model."""
    if stats is None:
        return jnp.zeros((), jnp.float32)
    rows = jnp.maximum(num_tokens.astype(jnp.float32) * cfg.num_layers, 1.0)
    return cfg.num_experts * jnp.sum((stats[0] / rows) * (stats[1] / rows))
