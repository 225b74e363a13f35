"""Run configs (ml-collections, `configs/base.py` lists every field): checks, renamed fields, and the
static settings objects that the jitted code takes.

    config.check(cfg)                          # renamed fields and old "unset" values, by name
    loss_cfg = config.loss_config(cfg)         # grpo_jax.loss.LossConfig
    sampling_cfg = config.sampling_config(cfg, tokenizer)

Fields that moved keep a message here: a config (file, command line or pipeline stage) that uses an
old name stops with the new one, instead of a bare "no such field".
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from ml_collections import ConfigDict

from grpo_jax import loss
from grpo_jax import sampler
from grpo_jax import sandbox

# old dotted name -> new dotted name
RENAMED = {
    "grpo.max_new_tokens": "sampling.max_new_tokens",
    "grpo.temperature": "sampling.temperature",
    "sft.steps": "cold_start.steps",
    "sft.learning_rate": "cold_start.optimizer.learning_rate",
}

# Fields whose "not set" was a sentinel value and is now None (placeholder(...) in configs/base.py).
# The old sentinel is refused where it would now mean something else.
UNSET_WAS = {
    "grpo.clip_eps_high": (0.0, "the same as clip_eps_low"),
    "grpo.dual_clip": (0.0, "off"),
    "grpo.scale_rewards": ("", "the estimator's own choice"),
    "sft.max_completion_tokens": (0, "sampling.max_new_tokens"),
    "sft.examples": (0, "every training row"),
    "rejection.max_problems": (0, "every training problem"),
    "data.eval_split": ("", "hold eval_size prompts out of `split`"),
    "data.config": ("", "none"),
    "init_from": ("", "none"),
}


# Fields added since pipelines first recorded their settings, with the value that behaves as before:
# a stage finished before a field existed matches a config that leaves the field at that value.
ADDED = {
    "model.residual_dtype": None,
    "grpo.rollout_correction": None,
    "grpo.rollout_correction_max": 2.0,
    "grpo.rollout_correction_min": None,
    "grpo.dynamic_sampling": False,
    "grpo.max_sampling_rounds": 3,
    "data.enable_thinking": None,
    "grpo.router_aux_loss_coef": 0.0,
    "sampling.top_p_candidates": 1024,
    "sampling.merge_lora": False,
    "model.lora.rank": 0,
    "model.lora.alpha": 16.0,
    "model.lora.dropout": 0.0,
    "model.lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # JSON
}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config or dict as {"section.field": value}."""
    out = {}
    for k, v in (d.items() if isinstance(d, (dict, ConfigDict)) else ()):
        if isinstance(v, (dict, ConfigDict)) and len(v):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def renamed(path: str) -> str | None:
    """The new name of a dotted field path that ends in an old name (also inside `stage.NAME.` or
    `cold_start.` overrides), or None."""
    parts = path.split(".")
    for i in range(len(parts)):
        new = RENAMED.get(".".join(parts[i:]))
        if new is not None:
            return ".".join(parts[:i] + [new])
    return None


def _rename_message(path: str, new: str) -> str:
    return f"config field {path!r} was renamed {new!r}: set {new} instead (see configs/base.py)"


def check(cfg: ConfigDict) -> None:
    """Stop on old field names and on old "unset" sentinels, naming the field and what to write."""
    for path, value in flatten(cfg).items():
        new = renamed(path)
        if new is not None:
            raise ValueError(_rename_message(path, new))
        old = UNSET_WAS.get(path)
        if old is not None and old[0] != "" and value == old[0] and not isinstance(value, bool):
            raise ValueError(f"config field {path}={value!r}: {old[0]!r} no longer means {old[1]}; leave "
                             f"the field unset (None) for that, or give a real value")
    if cfg.get("trainer") not in ("grpo", "sft"):
        raise ValueError(f"trainer={cfg.get('trainer')!r}; expected 'grpo' or 'sft'")
    isolation = cfg.get("verifier", {}).get("sandbox", "auto")
    if isolation not in sandbox.ISOLATIONS:
        raise ValueError(f"verifier.sandbox={isolation!r}; expected one of {sandbox.ISOLATIONS}")


def check_argv(argv: Sequence[str]) -> None:
    """Scripts: stop before flag parsing when a --config.FIELD override uses an old field name
    (ml-collections would only say the field does not exist)."""
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            path = arg[len("--config."):].split("=", 1)[0]
            new = renamed(path)
            if new is not None:
                sys.exit(f"{arg}: " + _rename_message(path, new))


def upgrade_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat settings saved before the renames and additions (pipeline stage markers) in today's names
    and values."""
    out = {}
    for path, value in flat.items():
        path = renamed(path) or path
        old = UNSET_WAS.get(path)
        out[path] = None if old is not None and value == old[0] else value
    return {**ADDED, **out}


def loss_config(cfg: ConfigDict) -> loss.LossConfig:
    g, s = cfg.grpo, cfg.sampling
    return loss.LossConfig(
        advantage_estimator=g.advantage_estimator, scale_rewards=g.scale_rewards, std_ddof=g.std_ddof,
        clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, dual_clip=g.dual_clip,
        beta=g.beta, kl_estimator=g.kl_estimator, aggregation=g.aggregation,
        max_completion_length=s.max_new_tokens, importance_level=g.importance_level,
        mask_truncated=g.mask_truncated, temperature=s.temperature, logprob_chunk=g.logprob_chunk,
        rollout_correction=g.rollout_correction, rollout_correction_max=g.rollout_correction_max,
        rollout_correction_min=g.rollout_correction_min, router_aux_loss_coef=g.router_aux_loss_coef)


def sampling_config(cfg: ConfigDict, tokenizer, model_eos: Sequence[int] = ()) -> sampler.SamplingConfig:
    """The `sampling` section. A completion stops at any of `sampling.eos_ids`, the checkpoint's EOS
    ids (`model_eos`: config.json and generation_config.json) and the tokenizer's EOS token. A
    tokenizer without a pad token (Llama 3) pads with its first stop id: padding is masked, and
    never a token of the completion."""
    s = cfg.sampling
    stops = [*s.eos_ids, *model_eos, getattr(tokenizer, "eos_token_id", None)]
    stops = tuple(dict.fromkeys(int(e) for e in stops if e is not None))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        if not stops:
            raise ValueError("the tokenizer has neither a pad nor an EOS token and sampling.eos_ids is empty: "
                             "set sampling.eos_ids")
        pad = stops[0]
    return sampler.SamplingConfig(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        top_p_candidates=s.top_p_candidates, first_segment=s.first_segment, shrink_factor=s.shrink_factor,
        eos_ids=stops, pad_id=int(pad), prompt_buckets=tuple(s.prompt_buckets))


def to_json(cfg: ConfigDict) -> str:
    """The config as JSON (what a run writes next to its checkpoints)."""
    return cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n"
