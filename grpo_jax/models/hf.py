"""Hugging Face checkpoints in and out, without torch.

    params, cfg = load_hf("path/to/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    save_hf(params, cfg, "out/")   # transformers.AutoModelForCausalLM.from_pretrained("out/") works

Weights are read and written with the `safetensors` library (numpy arrays; bfloat16 through
ml_dtypes), one tensor at a time.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from grpo_jax.models import architecture
from grpo_jax.models import transformer

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "mistral": "MistralForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}

# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as a supported model."""


# --------------------------------------------------------------------------------------------------
# config.json <-> architecture.ModelConfig


def config_from_hf(hf: dict[str, Any], dtype: str = "float32", param_dtype: str | None = None) -> architecture.ModelConfig:
    """Translate a transformers config.json dict (transformers 4 or 5 layout) into a architecture.ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(
            f"unknown architecture: model_type={model_type!r}, architectures={hf.get('architectures')}; "
            f"grpo_jax supports model_type in {sorted(SUPPORTED)} ({', '.join(SUPPORTED.values())})")
    gemma = model_type == "gemma3_text"
    act = hf.get("hidden_activation" if gemma else "hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"activation {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(cap) is not None:
            raise CheckpointError(f"{cap}={hf[cap]} (Gemma 2's soft-capping) is not supported")
    layer_types = tuple(hf.get("layer_types") or ())
    if set(layer_types) - {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"layer_types {sorted(set(layer_types))} are not supported; expected "
                              "'full_attention' and 'sliding_attention'")
    # Mistral: a window on every layer when sliding_window is set; Qwen2/Qwen3: only with
    # use_sliding_window, on the layers layer_types names (transformers derives them from max_window_layers).
    window = hf.get("sliding_window")
    experts = (hf.get("num_experts", hf.get("num_local_experts")) or 0) if model_type == "qwen3_moe" else 0
    if experts and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        raise CheckpointError(
            f"Qwen3-MoE with dense layers among the experts (mlp_only_layers={hf.get('mlp_only_layers')}, "
            f"decoder_sparse_step={hf.get('decoder_sparse_step')}) is not supported: every released Qwen3-MoE "
            "has experts in every layer (mlp_only_layers=[], decoder_sparse_step=1)")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window"):
        window = None
    if window is not None and model_type != "mistral" and not layer_types:  # transformers 4 configs
        first = hf.get("max_window_layers", hf["num_hidden_layers"])
        layer_types = tuple("sliding_attention" if i >= first else "full_attention"
                            for i in range(hf["num_hidden_layers"]))
    if window is not None and layer_types and "sliding_attention" not in layer_types:
        window = None
    if model_type == "llama":
        window = None
    if gemma and window is not None and not layer_types:
        raise CheckpointError("a gemma3_text config without layer_types is not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    local_theta = None
    if gemma:  # one set of rope parameters per layer type; the local layers' is plain RoPE
        local = dict(rope.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq", 10000.0)})
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope of the sliding-window layers {local} is not supported: expected plain RoPE")
        local_theta = float(local["rope_theta"])
        rope = dict(rope.get("full_attention") or {"rope_theta": hf.get("rope_theta", 1e6)})
    legacy = dict(hf.get("rope_scaling") or {})  # transformers 4
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **rope}
    if "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None

    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return architecture.ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        num_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 0) if experts else 0,
        moe_intermediate_size=hf.get("moe_intermediate_size", 0) if experts else 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if experts else False,
        gemma_norms=gemma, embed_scale=gemma, hidden_act=_ACTIVATIONS[act],
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma else None, rope_local_theta=local_theta,
        sliding_window=None if window is None else int(window),
        layer_types=layer_types if window is not None and layer_types else None,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        architecture=model_type,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def config_to_hf(cfg: architecture.ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json transformers needs to rebuild `cfg` (its `SUPPORTED` class)."""
    if cfg.architecture == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise CheckpointError("a qwen2 model has q/k/v biases and no o_proj/MLP biases; "
                              f"got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}")
    if cfg.architecture == "mistral" and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise CheckpointError("a mistral model has no biases")
    if cfg.architecture == "llama" and cfg.sliding_window is not None:
        raise CheckpointError("a llama model has no sliding window; save it as mistral")
    if (cfg.architecture == "qwen3_moe") != bool(cfg.num_experts):
        raise CheckpointError(f"experts are Qwen3-MoE's (architecture qwen3_moe); got num_experts={cfg.num_experts} "
                              f"for {cfg.architecture!r}")
    if cfg.architecture in ("llama", "qwen3", "qwen3_moe") and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(f"a {cfg.architecture} model has biases on all of q/k/v/o_proj or none; "
                              f"got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    gemma = cfg.architecture == "gemma3_text"
    if cfg.qk_norm != (cfg.architecture in ("qwen3", "qwen3_moe", "gemma3_text")):
        raise CheckpointError(f"q/k norms are Qwen3's and Gemma 3's; got qk_norm={cfg.qk_norm} for {cfg.architecture!r}")
    if gemma != cfg.gemma_norms or gemma != cfg.embed_scale or (cfg.hidden_act == "gelu_tanh") != gemma:
        raise CheckpointError(f"Gemma's norms, embedding scale and GeLU go together with architecture "
                              f"gemma3_text; got {cfg.architecture!r}")
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **dict(cfg.rope_scaling or {})}
    eos = list(cfg.eos_token_ids)
    hf = {
        "architectures": [SUPPORTED[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",  # gemma: hidden_activation below
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "dtype": dtype or cfg.param_dtype,
    }
    if cfg.architecture == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.architecture == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    elif gemma:
        del hf["hidden_act"]
        scalar = cfg.query_pre_attn_scalar
        hf.update(hidden_activation="gelu_pytorch_tanh",
                  query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                  attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                  layer_types=list(cfg.layer_types or ["sliding_attention" if w else "full_attention"
                                                       for w in cfg.sliding_layers]),
                  rope_parameters={"full_attention": rope, "sliding_attention": {
                      "rope_type": "default", "rope_theta": cfg.rope_local_theta}},
                  final_logit_softcapping=None, attn_logit_softcapping=None)
    else:  # qwen2, qwen3, qwen3_moe
        if cfg.architecture in ("qwen3", "qwen3_moe"):
            hf.update(attention_bias=cfg.qkv_bias)
        if cfg.num_experts:
            hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                      moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[])
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  layer_types=list(cfg.layer_types or ["sliding_attention" if w else "full_attention"
                                                       for w in cfg.sliding_layers]))
    return hf


# --------------------------------------------------------------------------------------------------
# Parameter name map


def _name_map(cfg: architecture.ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...], bool]]:
    """(our path, HF name with {i} for the layer and {j} for the expert, HF shape, transposed) for
    every parameter.

    HF linear weights are [out, in]; our kernels are [in..., out...], so ours = W.T.reshape(...).
    Experts are stored one tensor per expert (mlp.experts.{j}.gate_proj.weight, as on the hub and as
    transformers writes them); ours are stacked [layers, experts, ...].
    """
    d, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    L = "model.layers.{i}."
    # Llama's post_attention_layernorm is the norm before the MLP; Gemma's follows attention.
    mlp_norm = "pre_feedforward_layernorm" if cfg.gemma_norms else "post_attention_layernorm"
    m = [
        (("embedding",), "model.embed_tokens.weight", (V, d), False),
        (("final_norm", "scale"), "model.norm.weight", (d,), False),
        (("layers", "attn_norm", "scale"), L + "input_layernorm.weight", (d,), False),
        (("layers", "mlp_norm", "scale"), L + mlp_norm + ".weight", (d,), False),
        (("layers", "attn", "q_proj", "kernel"), L + "self_attn.q_proj.weight", (q, d), True),
        (("layers", "attn", "k_proj", "kernel"), L + "self_attn.k_proj.weight", (kv, d), True),
        (("layers", "attn", "v_proj", "kernel"), L + "self_attn.v_proj.weight", (kv, d), True),
        (("layers", "attn", "o_proj", "kernel"), L + "self_attn.o_proj.weight", (d, q), True),
    ]
    if cfg.num_experts:
        fe, X = cfg.moe_intermediate_size, L + "mlp.experts.{j}."
        m += [(("layers", "moe", "router"), L + "mlp.gate.weight", (cfg.num_experts, d), True),
              (("layers", "moe", "gate_proj"), X + "gate_proj.weight", (fe, d), True),
              (("layers", "moe", "up_proj"), X + "up_proj.weight", (fe, d), True),
              (("layers", "moe", "down_proj"), X + "down_proj.weight", (d, fe), True)]
    else:
        m += [(("layers", "mlp", "gate_proj", "kernel"), L + "mlp.gate_proj.weight", (f, d), True),
              (("layers", "mlp", "up_proj", "kernel"), L + "mlp.up_proj.weight", (f, d), True),
              (("layers", "mlp", "down_proj", "kernel"), L + "mlp.down_proj.weight", (d, f), True)]
    if cfg.qkv_bias:
        m += [(("layers", "attn", p, "bias"), L + f"self_attn.{p}.bias", (n,), False)
              for p, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))]
    if cfg.o_bias:
        m.append((("layers", "attn", "o_proj", "bias"), L + "self_attn.o_proj.bias", (d,), False))
    if cfg.gemma_norms:
        m += [(("layers", "post_attn_norm", "scale"), L + "post_attention_layernorm.weight", (d,), False),
              (("layers", "post_mlp_norm", "scale"), L + "post_feedforward_layernorm.weight", (d,), False)]
    if cfg.qk_norm:
        m += [(("layers", "attn", f"{p}_norm", "scale"), L + f"self_attn.{p}_norm.weight", (cfg.head_dim,), False)
              for p in ("q", "k")]
    if cfg.mlp_bias:
        m += [(("layers", "mlp", p, "bias"), L + f"mlp.{p}.bias", (n,), False)
              for p, n in (("gate_proj", f), ("up_proj", f), ("down_proj", d))]
    if not cfg.tie_word_embeddings:
        m.append((("lm_head",), "lm_head.weight", (V, d), True))
    return m


def _names(template: str, cfg: architecture.ModelConfig) -> list[str]:
    """The HF names of a _name_map template, layer-major then expert: the order of our stacked axes."""
    layers = range(cfg.num_layers) if "{i}" in template else [0]
    experts = range(cfg.num_experts) if "{j}" in template else [0]
    return [template.format(i=i, j=j) for i in layers for j in experts]


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------------
# safetensors (the `safetensors` library; numpy arrays, bfloat16 through ml_dtypes)


class _Tensors:
    """The tensors of a checkpoint's safetensors files by name, each read when it is asked for, so
    that loading holds one parameter at a time in host memory, not the whole checkpoint."""

    def __init__(self, files: list[Path]):
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        for path in files:
            try:
                f = self._stack.enter_context(safetensors.safe_open(path, framework="numpy"))
            except (safetensors.SafetensorError, OSError, ValueError) as e:
                self._stack.close()
                raise CheckpointError(f"{path}: not a safetensors file this reader understands ({e})") from e
            self._where.update(dict.fromkeys(f.keys(), f))

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def block(self, name: str, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
        """tensor[lo:hi, ...] for each dimension's (lo, hi): only those bytes are read."""
        return self._where[name].get_slice(name)[tuple(slice(lo, hi) for lo, hi in ranges)]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def close(self) -> None:
        self._stack.close()


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file, written to a temporary name and renamed into place: readers never see
    half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                                metadata={"format": "pt"})
    os.replace(tmp, path)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          f"(found {found}); only safetensors checkpoints are read")


# --------------------------------------------------------------------------------------------------
# load / save


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, safetensors, tokenizer) when a hub
    is reachable."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint folder with config.json")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_id)):
        raise CheckpointError(f"checkpoint folder {p} does not exist (and is not a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.tiktoken", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(f"could not fetch {path_or_id!r} from the hub: {e}") from e


def load_config(path_or_id: str | os.PathLike, dtype: str = "float32", *, param_dtype: str | None = None,
                **config_overrides: Any) -> architecture.ModelConfig:
    """The architecture.ModelConfig of a Hugging Face folder (or hub id) from its config.json, without the weights."""
    folder = resolve_checkpoint(path_or_id)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: missing config.json")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), dtype, param_dtype)
    # The EOS ids of config.json and of generation_config.json (where chat models list the end of a
    # turn, <|im_end|> or <|eot_id|>): a completion stops at any of them.
    eos = cfg.eos_token_ids + tuple(e for e in _generation_eos(folder) if e not in cfg.eos_token_ids)
    return cfg.replace(eos_token_ids=eos, **config_overrides)


def _generation_eos(folder: Path) -> tuple[int, ...]:
    path = folder / "generation_config.json"
    if not path.exists():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def load_hf(
    path_or_id: str | os.PathLike,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    shardings: architecture.Params | None = None,
    **config_overrides: Any,
) -> tuple[architecture.Params, architecture.ModelConfig]:
    """Read a Hugging Face checkpoint folder (or hub id) of a `SUPPORTED` family into our parameters.

    Args:
      path_or_id: folder with config.json and model.safetensors (or a sharded index), or a hub id.
      dtype: compute dtype of the returned config ("float32", "bfloat16").
      param_dtype: storage dtype of the parameters; defaults to `dtype`.
      shardings: optional pytree of jax.sharding.Sharding like the parameters; each array is placed
        directly with it (so a large model never sits whole on one device).
      **config_overrides: architecture.ModelConfig fields to override (e.g. remat="full").

    Returns:
      (params, cfg). Raises CheckpointError naming the problem for a bad folder.
    """
    folder = resolve_checkpoint(path_or_id)
    cfg = load_config(folder, dtype, param_dtype=param_dtype, **config_overrides)
    tensors = _Tensors(_weight_files(folder))
    try:
        return _load_params(folder, cfg, tensors, shardings), cfg
    finally:
        tensors.close()


def _load_params(folder: Path, cfg: architecture.ModelConfig, tensors: _Tensors, shardings: architecture.Params | None) -> architecture.Params:
    shapes = transformer.param_shapes(cfg)
    target = jnp.dtype(cfg.param_dtype)
    used, missing, params = set(), [], {}
    for path, name, hf_shape, transposed in _name_map(cfg):
        names = _names(name, cfg)
        absent = [n for n in names if n not in tensors]
        if absent:
            missing += absent
            continue
        want = _get(shapes, path).shape
        for n in names:
            if tensors.shape(n) != hf_shape:
                raise CheckpointError(f"{folder}: tensor {n!r} has shape {tensors.shape(n)}, expected "
                                      f"{hf_shape} for the model in config.json")
        used.update(names)
        stacked = ("{i}" in name) + ("{j}" in name)  # leading [layers, experts] axes of ours
        read = functools.partial(_read_shard, tensors, names, hf_shape, transposed, want, stacked, target)
        sharding = None if shardings is None else _get(shardings, path)
        if sharding is None:
            _set(params, path, jnp.asarray(read(tuple(slice(None) for _ in want))))
        else:  # each device's shard only, on the host that holds the device
            _set(params, path, jax.make_array_from_callback(want, sharding, read))
    if missing:
        raise CheckpointError(f"{folder}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    extra = [n for n in tensors.names() if n not in used and not _IGNORED.match(n)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{folder}: checkpoint has {len(extra)} tensors this {cfg.architecture} "
                              f"model does not use, e.g. {sorted(extra)[:5]}")
    return params


def _read_shard(tensors: _Tensors, names: list[str], hf_shape: tuple[int, ...], transposed: bool,
                want: tuple[int, ...], stacked: int, target: Any, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of one of our parameters ([layers, experts, ...] `want`), read layer by layer
    from the HF tensors `names` (each `hf_shape`; ours = hf.T.reshape(...) when `transposed`), so host
    memory holds this block and one layer's part of it, never the stacked parameter."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, want))
    out = np.empty(tuple(s.stop - s.start for s in index), target)
    per_layer, inner = want[stacked:], index[stacked:]
    experts = want[1] if stacked == 2 else 1
    for pos in itertools.product(*(range(s.start, s.stop) for s in index[:stacked])):
        n = names[pos[0] * experts + pos[1] if stacked == 2 else pos[0] if stacked else 0]
        at = tuple(p - s.start for p, s in zip(pos, index))
        out[at] = _read_layer(tensors, n, hf_shape, transposed, per_layer, inner).astype(target)
    return out


def _read_layer(tensors: _Tensors, name: str, hf_shape: tuple[int, ...], transposed: bool,
                per_layer: tuple[int, ...], inner: tuple[slice, ...]) -> np.ndarray:
    """ours[inner] of one HF tensor, ours = (hf.T if transposed else hf).reshape(per_layer): only the
    HF rows and columns it covers are read when each group of our dims that one HF dim splits into
    is cut in its first dim only (the layouts' usual case: a head, row or column range), else all."""
    src = hf_shape[::-1] if transposed else hf_shape
    groups, k = [], 0  # our dims each source dim splits into (row-major)
    for size in src:
        start = k
        while k < len(per_layer) and (k == start or math.prod(per_layer[start:k]) < size):
            k += 1
        groups.append(range(start, k))
    ranges = []
    for g in groups:
        dims = list(g)
        if any(inner[d] != slice(0, per_layer[d], 1) for d in dims[1:]) or math.prod(per_layer[d] for d in dims) == 0:
            ranges = None
            break
        step = math.prod(per_layer[d] for d in dims[1:])
        ranges.append((inner[dims[0]].start * step, inner[dims[0]].stop * step))
    exact = k == len(per_layer) and all(math.prod(per_layer[d] for d in g) == n for g, n in zip(groups, src))
    if ranges is None or not exact:
        whole = tensors[name]
        return (whole.T if transposed else whole).reshape(per_layer)[inner]
    block = tensors.block(name, tuple(ranges[::-1]) if transposed else tuple(ranges))
    return (block.T if transposed else block).reshape(tuple(s.stop - s.start for s in inner))


def hf_state_dict(params: architecture.Params, cfg: architecture.ModelConfig, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Our parameters as HF-named numpy arrays (the inverse of load_hf's mapping)."""
    target = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    out = {}
    for path, name, hf_shape, transposed in _name_map(cfg):
        a = np.asarray(jax.device_get(_get(params, path))).astype(target)
        names = _names(name, cfg)
        for n, w in zip(names, a.reshape(len(names), -1)):  # flat: reshaped to HF's shape below
            w = w.reshape(hf_shape[::-1]).T if transposed else w.reshape(hf_shape)
            out[n] = np.ascontiguousarray(w)
    return out


def save_hf(
    params: architecture.Params,
    cfg: architecture.ModelConfig,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write params as a Hugging Face folder (config.json + safetensors, sharded with an index past
    `max_shard_bytes`) that transformers and vLLM load unchanged. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(params, cfg, dtype)
    hf_cfg = config_to_hf(cfg, dtype=str(jnp.dtype(dtype or cfg.param_dtype)))
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")

    shards, size = [[]], 0
    for name, a in state.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        _write_tensors(folder / "model.safetensors", state)
    else:
        weight_map = {}
        for k, names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_tensors(folder / fname, {n: state[n] for n in names})
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
