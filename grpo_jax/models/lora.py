"""LoRA adapters on a frozen base model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", eq. 3): a targeted projection W [in, out] computes x W + (x A) B * alpha / r, with A [in, r]
and B [r, out] trained and W frozen.

    cfg = cfg.replace(lora_rank=16, lora_alpha=32.0)          # ModelConfig: which projections, rank, alpha
    params = lora.add_adapters(base, cfg, key)                # the base's arrays, plus fresh adapters
    base, adapters = lora.split(params)                       # train `adapters`, keep `base` frozen
    logits = transformer.forward(lora.join(base, adapters), cfg, ...)
    ref = transformer.forward(base, lora.base_config(cfg), ...)     # the reference: adapters off, no copy

The adapters live in the parameter tree next to the kernel they adapt (`q_proj_lora` {a, b} beside
`q_proj` {kernel}), stacked over layers like every layer parameter, so everything that takes a
parameter pytree (forward, sharding, the sampler, log-probabilities) takes them unchanged; a model
run with lora_rank=0 never reads them. `save_peft` writes a PEFT adapter folder that `peft` loads onto
the transformers model; `merged` folds the adapters into the kernels (for a merged HF export or a
sampling copy).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import placement
from grpo_jax.models import transformer

_SUFFIX = "_lora"


def split(params: architecture.Params) -> tuple[architecture.Params, architecture.Params]:
    """(base, adapters): two trees with the same nesting, each holding only its own leaves (the same
    arrays, not copies)."""
    base, adapters = {}, {}
    for k, v in params.items():
        if k.endswith(_SUFFIX):
            adapters[k] = v
        elif isinstance(v, dict):
            base[k], sub = split(v)
            if sub:
                adapters[k] = sub
        else:
            base[k] = v
    return base, adapters


def join(base: architecture.Params, adapters: architecture.Params) -> architecture.Params:
    """The union of two trees from `split` (no copies: the same arrays)."""
    if not isinstance(adapters, dict):
        return adapters
    return {**base, **{k: join(base.get(k, {}), v) for k, v in adapters.items()}}


def with_base(frozen: architecture.Params | None, trained: architecture.Params) -> architecture.Params:
    """The model's tree from what a run trains and its frozen base: join(frozen, adapters) for LoRA,
    `trained` itself when there is no frozen base (a full fine-tune)."""
    return trained if frozen is None else join(frozen, trained)


def base_config(cfg: architecture.ModelConfig) -> architecture.ModelConfig:
    """The config that runs the frozen base: the same parameters with the adapters off."""
    return cfg.replace(lora_rank=0)


def frozen_config(cfg: architecture.ModelConfig) -> architecture.ModelConfig:
    """The config of the frozen base's tree as a LoRA run stores it: no adapters, in the compute dtype
    (it only runs forward; its gradient is never taken)."""
    return cfg.replace(lora_rank=0, param_dtype=cfg.dtype)


def add_adapters(base: architecture.Params, cfg: architecture.ModelConfig, key: jax.Array, mesh=None) -> architecture.Params:
    """`base` (the arrays themselves, not copies) with freshly initialised adapters for `cfg`'s targets
    (A uniform in +-1/sqrt(fan_in), B zero: the adapted model starts equal to the base), placed by
    the mesh's parameter rules when `mesh` is given."""
    if not cfg.lora_rank:
        raise ValueError("add_adapters needs cfg.lora_rank > 0")
    shardings = None if mesh is None else split(placement.param_shardings(cfg, mesh))[1]
    # Only the adapters leave the jitted init, so XLA drops the base's random initialisation.
    adapters = jax.jit(lambda k: split(transformer.init_params(cfg, k))[1], out_shardings=shardings)(key)
    return join(base, adapters)


def fingerprint(base: architecture.Params) -> str:
    """A short hash of a parameter tree's values, to tell a checkpoint's LoRA base or KL reference
    from another: every leaf's path, shape and 1,024 evenly spaced values (read exactly, so any mesh
    gives the same hash)."""
    leaves = jax.tree_util.tree_leaves_with_path(base)
    # Replicated on the leaves' mesh: every host of a multi-host run reads the same values.
    whole = [NamedSharding(x.sharding.mesh, P()) if isinstance(getattr(x, "sharding", None), NamedSharding) else None
             for _, x in leaves]
    picks = jax.jit(lambda xs: [x.reshape(-1)[np.linspace(0, x.size - 1, min(x.size, 1024)).astype(np.int64)]
                                .astype(jnp.float32) for x in xs], out_shardings=whole)([x for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), vals in zip(leaves, jax.device_get(picks)):
        h.update(f"{jax.tree_util.keystr(path)}{tuple(x.shape)}".encode())
        h.update(np.ascontiguousarray(vals).tobytes())
    return h.hexdigest()[:16]


def merged(params: architecture.Params, cfg: architecture.ModelConfig) -> architecture.Params:
    """The base parameters with every adapter folded into its kernel, W + A B * alpha / r (in the
    kernel's dtype), and no adapters: the tree and config (`base_config(cfg)`) of a plain model."""
    base, adapters = split(params)
    scale = cfg.lora_alpha / cfg.lora_rank

    def fold(tree, adapter_tree):
        out = dict(tree)
        for name, sub in adapter_tree.items():
            if name.endswith(_SUFFIX):
                target = name[: -len(_SUFFIX)]
                kernel = tree[target]["kernel"]
                a, b = sub["a"].astype(jnp.float32), sub["b"].astype(jnp.float32)
                folded = kernel.astype(jnp.float32) + scale * _outer(a, b)
                out[target] = {**tree[target], "kernel": folded.astype(kernel.dtype)}
            else:
                out[name] = fold(tree[name], sub)
        return out

    return fold(base, adapters)


def _outer(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [L, *in, r] x b [L, r, *out] -> [L, *in, *out]: the stacked layers' A B."""
    L, r = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1))
    return flat.reshape(*a.shape[:-1], *b.shape[2:])


# --------------------------------------------------------------------------------------------------
# PEFT adapter folders


def _hf_module(name: str) -> str:
    return ("model.layers.{i}.self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj")
            else "model.layers.{i}.mlp.") + name


def peft_tensors(params: architecture.Params, cfg: architecture.ModelConfig) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them: base_model.model.<module>.lora_A.weight [r, in] and
    lora_B.weight [out, r] per layer (torch Linear layout: ours transposed, heads flattened)."""
    _, adapters = split(params)
    layers = adapters.get("layers", {})
    out = {}
    for group in layers.values():
        for name, ab in group.items():
            a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
            for i in range(cfg.num_layers):
                key = "base_model.model." + _hf_module(name[: -len(_SUFFIX)]).format(i=i)
                out[key + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, cfg.lora_rank).T)
                out[key + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(cfg.lora_rank, -1).T)
    return out


def save_peft(folder: str | os.PathLike, params: architecture.Params, cfg: architecture.ModelConfig,
              base_model: str = "") -> Path:
    """Write a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(transformers_model, folder)` loads onto the base model."""
    import safetensors.numpy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": 0.0, "target_modules": sorted(cfg.lora_targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_model}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(peft_tensors(params, cfg), str(folder / "adapter_model.safetensors"))
    return folder
