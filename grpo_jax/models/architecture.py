"""What a decoder is: ModelConfig (sizes, family switches, compute dtypes, LoRA) and SHAPES, the
named shapes of the models people run GRPO on (weights come from grpo_jax.models.hf).

Params is a nested dict of arrays; Cache is the KV cache dict of grpo_jax.models.transformer:
    k, v:  [layers, batch, max_len, kv_heads, head_dim]  keys/values by cache slot
    mask:  [batch, max_len] bool                          which slots hold real tokens
    pos:   [batch] int32                                  next rotary position of each row
    index: [] int32                                       next slot to write (shared by all rows)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


Array = jax.Array

Params = Any  # nested dict of arrays


Cache = dict[str, Array]


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


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
    # log-probabilities then differ by a third less (benchmarks/bench_mismatch.py), for twice the
    # memory of the residual activations (the remat checkpoints).
    residual_dtype: str | None = None
    remat: str = "none"  # "none" | "full" | "dots": activation checkpointing of each layer
    # False unrolls the layer loop (one copy of each layer in the program): longer compiles, and what
    # XLA's cost analysis needs to count every layer (it counts a loop's body once).
    scan_layers: bool = True
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
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; expected one of {list(ATTENTION_IMPLS)}")
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
