"""Run configs (ml-collections, `configs/base.py` lists every field): checks, renamed fields, and the
static settings objects that the jitted code takes.

    config.check(cfg)                          # renamed fields and old "unset" values, by name
    loss_cfg = grpo.loss_config(cfg)           # grpo_jax.rl.loss.LossConfig
    sampling_cfg = config.sampling_config(cfg, tokenizer)

Fields that moved keep a message here: a config (file, command line or pipeline stage) that uses an
old name stops with the new one, instead of a bare "no such field".
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
import warnings
from typing import Any, Sequence

from ml_collections import ConfigDict

from grpo_jax.common import storage
from grpo_jax.rewards import scoring
from grpo_jax.rewards.sandbox import runner
from grpo_jax.rl import grpo
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools

class ConfigError(ValueError):
    """A config field with a value the run cannot use; the message names the field and the value."""


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
            raise ConfigError(_rename_message(path, new))
        old = UNSET_WAS.get(path)
        if old is not None and old[0] != "" and value == old[0] and not isinstance(value, bool):
            raise ConfigError(f"config field {path}={value!r}: {old[0]!r} no longer means {old[1]}; leave "
                             f"the field unset (None) for that, or give a real value")
    if cfg.get("trainer") not in ("grpo", "sft"):
        raise ConfigError(f"trainer={cfg.get('trainer')!r}; expected 'grpo' or 'sft'")
    _check_ranges(cfg)
    _check_tools(cfg)
    for field in ("workdir", "init_from"):
        try:
            storage.path(cfg.get(field) or ".")
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
    isolation = cfg.get("verifier", {}).get("sandbox", "auto")
    if isolation not in runner.ISOLATIONS:
        raise ConfigError(f"verifier.sandbox={isolation!r}; expected one of {runner.ISOLATIONS}")
    plan = cfg.get("memory_plan", "auto")
    if plan not in ("auto", "on", "off"):
        raise ConfigError(f"memory_plan={plan!r}; expected 'auto' (where the device reports its memory), 'on' or 'off'")
    on_hang = cfg.get("verifier", {}).get("on_hang", "stop")
    if on_hang not in ("disable", "stop"):
        raise ConfigError(f"verifier.on_hang={on_hang!r}; expected 'stop' or 'disable'")
    if cfg.get("trainer") == "grpo" and "grpo" in cfg and "sampling" in cfg:
        try:  # the loss's own checks (clip range, beta, ...), before any stage runs
            grpo.loss_config(cfg)
        except ValueError as e:
            raise ConfigError(f"grpo: {e}") from None


def uses_tools(cfg: ConfigDict) -> bool:
    """Multi-turn rollouts: the config names tools or an environment."""
    t = cfg.get("tools")
    return bool(t and (t.get("names") or t.get("environment")))


def tool_budgets(t: ConfigDict) -> multi_turn.Budgets:
    names = [f.name for f in dataclasses.fields(multi_turn.Budgets)]
    return multi_turn.Budgets(**{k: t[k] for k in names if k in t})


def _check_tools(cfg: ConfigDict) -> None:
    if not uses_tools(cfg):
        return
    t = cfg.tools
    for name in t.names:
        if name not in tools.BUILT_IN and "." not in name:
            raise ConfigError(f"tools.names: {name!r}; expected one of {sorted(tools.BUILT_IN)} or an import path "
                             "(package.module.function)")
    try:
        tool_formats.get(t.format)
        tool_budgets(t)
        if t.get("environment"):
            tools.environment_class(t.environment)
        if t.get("drop_void_turns"):
            scoring.get_reward_fn(t.get("answer_reward", "answer_format"))
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


# field -> (lowest allowed value, what it is for): checked before any work, so that a wrong value stops
# the run at once, by name, instead of training nothing or crashing after the cold start.
AT_LEAST = {
    "steps": (1, "training steps"), "cold_start.steps": (0, "cold-start SFT steps (0: none)"),
    "grpo.prompts_per_step": (1, "prompts per step"), "grpo.num_iterations": (1, "updates per rollout"),
    "grpo.minibatches": (1, "optimizer steps per rollout"), "grpo.microbatches": (1, "gradient-accumulation chunks"),
    "sft.batch_size": (1, "examples per SFT step"), "sft.microbatches": (1, "gradient-accumulation chunks"),
    "sampling.max_new_tokens": (1, "completion length"), "sampling.top_k": (0, "0: off"),
    "data.eval_size": (0, "held-out problems"), "eval.every": (0, "0: only at the end"), "eval.k": (1, "samples"),
    "eval.batch_size": (1, "rows"), "checkpoint.every": (0, "0: only at the end"), "checkpoint.keep": (1, "checkpoints"),
    "optimizer.warmup_steps": (0, "steps"), "optimizer.max_nonfinite_updates": (1, "updates"),
    "verifier.hang_after": (1, "timeouts"), "verifier.max_failing_steps": (1, "steps"),
    "grpo.max_row_tokens": (16, "tokens per packed row"),
}


def _check_ranges(cfg: ConfigDict) -> None:
    flat = flatten(cfg)
    for path, (low, what) in AT_LEAST.items():
        v = flat.get(path)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ConfigError(f"{path}={v!r}; expected an integer >= {low} ({what})")
    gb = flat.get("checkpoint.verify_gb")
    if gb is not None and not (isinstance(gb, (int, float)) and not isinstance(gb, bool) and gb >= 0):
        raise ConfigError(f"checkpoint.verify_gb={gb!r}; expected a number >= 0 (GB of a checkpoint read back to "
                         "verify it before a restore)")
    lr = flat.get("optimizer.learning_rate")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optimizer.learning_rate={lr!r}; expected a finite number > 0 (a negative rate ascends "
                         "the loss)")
    every_s = flat.get("log.every_s")
    if every_s is not None and not (isinstance(every_s, (int, float)) and every_s >= 0):
        raise ConfigError(f"log.every_s={every_s!r}; expected seconds >= 0 (0: off)")
    for path, what in (("verifier.timeout_s", "per completion"), ("verifier.load_timeout_s", "to load a function")):
        timeout = flat.get(path)
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"{path}={timeout!r}; expected seconds > 0 {what}")
    t = flat.get("sampling.temperature")
    if t is not None and not (isinstance(t, (int, float)) and t > 0):
        raise ConfigError(f"sampling.temperature={t!r}; expected > 0 (greedy decoding is evaluation's own)")
    p = flat.get("sampling.top_p")
    if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ConfigError(f"sampling.top_p={p!r}; expected 0 < top_p <= 1")
    eos = flat.get("sampling.eos_ids") or ()
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in eos):
        raise ConfigError(f"sampling.eos_ids={tuple(eos)!r}; expected token ids >= 0")
    if cfg.get("trainer") == "grpo":
        g = cfg.grpo
        if g.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={g.num_generations!r}; expected >= 2: advantages compare the "
                             "completions of one prompt, so a group of 1 has advantage 0 and trains nothing")
        n = g.prompts_per_step * g.num_generations
        if n % (g.minibatches * g.microbatches):
            raise ConfigError(f"grpo.prompts_per_step x grpo.num_generations = {g.prompts_per_step} x {g.num_generations}"
                             f" = {n} completions do not split into grpo.minibatches={g.minibatches} x "
                             f"grpo.microbatches={g.microbatches} equal parts")
        if g.get("packing") and cfg.model.get("attention") == "cudnn":
            raise ConfigError("grpo.packing=True with model.attention='cudnn': the cuDNN kernel reads segment "
                              "lengths, not the prefix-sharing mask of packed rows; set model.attention='xla' "
                              "(exact on packed rows) or 'einsum', or grpo.packing=False")
    s = cfg.get("sft")
    if s is not None and s.batch_size % s.microbatches:
        raise ConfigError(f"sft.batch_size={s.batch_size} does not split into sft.microbatches={s.microbatches}")


def check_mesh(cfg: ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """The mesh against the devices, and the batches against the mesh's batch axes (data x fsdp x
    expert), before any model is loaded. Several hosts: each update's rows must split evenly over
    the batch axes (jax.make_array_from_callback needs it); one host replicates a batch that does
    not, so every device would compute all of it: said, not refused."""
    m = cfg.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "expert": m.get("expert", 1), "tensor": m.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or v == 0 or v < -1]
    if bad or list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh={sizes}: sizes are positive integers, at most one -1 (the rest of the devices)")
    if (-1 in sizes.values() and num_devices % fixed) or (-1 not in sizes.values() and fixed != num_devices):
        raise ConfigError(f"mesh={sizes} does not fit the {num_devices} devices (the sizes multiply to the device "
                          "count; one of them may be -1)")
    shards = math.prod(num_devices // fixed if v == -1 else v for k, v in sizes.items() if k != "tensor")
    dcn, data = m.get("dcn_data", 1), num_devices // fixed if sizes["data"] == -1 else sizes["data"]
    if not isinstance(dcn, int) or dcn < 1 or data % dcn or (dcn > 1 and num_processes % dcn):
        raise ConfigError(f"mesh.dcn_data={dcn!r}: expected a divisor of the data axis ({data}) and of the "
                          f"{num_processes} hosts (the data axis spans that many slices or hosts)")
    if cfg.get("trainer") == "grpo":
        g = cfg.grpo
        rows = g.prompts_per_step * g.num_generations // (g.minibatches * g.microbatches)
        where = (f"grpo.prompts_per_step x grpo.num_generations / (grpo.minibatches x grpo.microbatches) = {rows} rows "
                 f"per update chunk")
    else:
        rows = cfg.sft.batch_size // cfg.sft.microbatches
        where = f"sft.batch_size / sft.microbatches = {rows} rows per update chunk"
    if rows % shards:
        what = (f"{where} do not split over the mesh's batch axes (data x fsdp x expert = {shards} of {num_devices} "
                "devices)")
        if num_processes > 1:
            raise ConfigError(f"{what}: with {num_processes} hosts they must; change the batch or the mesh")
        warnings.warn(f"{what}: each update chunk is replicated, every device computing all of it", stacklevel=2)


def check_token_ids(cfg: ConfigDict, vocab_size: int) -> None:
    """Stop ids must be tokens of the model (checked once the tokenizer and model config are known)."""
    bad = [i for i in cfg.sampling.eos_ids if i >= vocab_size]
    if bad:
        raise ConfigError(f"sampling.eos_ids={tuple(cfg.sampling.eos_ids)!r}: {bad} outside the vocabulary of "
                         f"{vocab_size} tokens")


def check_argv(argv: Sequence[str], default_config: str | None = None) -> None:
    """Scripts: stop before flag parsing when a --config.FIELD override uses an old field name
    (ml-collections would only say the field does not exist), and in one line when the field does not
    exist at all, with the nearest names (`default_config`: the script's config file when --config
    is not given)."""
    paths = []
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            path = arg[len("--config."):].split("=", 1)[0]
            new = renamed(path)
            if new is not None:
                sys.exit(f"{arg}: " + _rename_message(path, new))
            paths.append(path)
    source = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), default_config)
    if paths and source:
        try:
            fields = _fields(load_file(source))
        except Exception:  # noqa: BLE001 -- flag parsing will say what is wrong with the file itself
            return
        for path in paths:
            if path not in fields:
                near = difflib.get_close_matches(path, fields, n=3, cutoff=0.6)
                sys.exit(f"--config.{path}: {source.split(':')[0]} has no field {path!r}" +
                         (f"; did you mean {' or '.join(near)}?" if near else " (configs/base.py lists every field)"))


def load_file(source: str) -> ConfigDict:
    """get_config() of a config file, "path.py" or "path.py:ARG" (as --config= takes it)."""
    path, _, arg = source.partition(":")
    spec = importlib.util.spec_from_file_location("_grpo_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, root)  # config files import `configs.base`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module.get_config(arg) if arg else module.get_config()


def _fields(cfg: ConfigDict, prefix: str = "") -> set[str]:
    """Every settable dotted path: leaves and sections (a section can be set whole)."""
    out = set()
    for k, v in cfg.items():
        out.add(prefix + k)
        if isinstance(v, ConfigDict):
            out |= _fields(v, f"{prefix}{k}.")
    return out


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
