"""Multi-stage recipes such as DeepSeek-R1's: cold-start SFT -> GRPO -> rejection-sampling SFT -> GRPO.

A pipeline config is an ordinary config (the fields every stage shares) plus

    c.stages = "cold_start,grpo,rejection_sft,final_grpo"        # the order
    c.stage.cold_start = dict(trainer="sft", steps=600, optimizer=dict(learning_rate=1e-3))
    c.stage.grpo = dict(trainer="grpo", steps=1200)               # overrides of the shared fields

Stage NAME runs in WORKDIR/NAME with its overrides applied (nested dicts merge field by field;
`rewards`, `reward_functions`, `rejection.rewards` and `model.overrides` are replaced whole), starts
from the previous stage's final checkpoint (`init_from`), and writes WORKDIR/NAME/stage.json when it
is done. Running the same command again skips finished stages and resumes an unfinished one from its
latest checkpoint, so a pipeline can be interrupted anywhere. stage.json keeps the stage's settings
(the fields its trainer reads: an SFT stage's are not GRPO's, so tuning GRPO after a finished cold
start reuses it) and a fingerprint of them chained with the previous stage's: a finished stage whose
settings (or an earlier stage's) have changed since is an error naming the change, never silently
reused.

    python scripts/train.py --config=configs/r1_pipeline.py --config.stage.grpo.steps=300

A GRPO config with `cold_start.steps > 0` is the two-stage pipeline `cold_start,grpo`: the cold start
is an SFT stage of its own (the `cold_start` section holds its overrides), checkpointed and resumed
like any stage, in WORKDIR/cold_start; the GRPO run itself is in WORKDIR/grpo.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

from grpo_jax.common import storage
from grpo_jax.rollout import policy
from grpo_jax.run import checkpoint
from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import trainer
from grpo_jax.run import workdir_lock

_WHOLE = {"rewards", "reward_functions", "rejection.rewards", "model.overrides"}  # replaced, not merged
# Settings that do not change what a stage trains: where it lives, logging, evaluation, checkpoint
# cadence, and how it executes (device mesh, rematerialisation, attention kernel, the sampler's weight
# layout, decode segments and batch shrinking, verifier processes).
# Changing them never invalidates a stage.
_UNTRACKED = ("workdir", "init_from", "resume", "compilation_cache", "memory_plan", "log", "eval", "checkpoint", "mesh", "model.remat",
              "model.attention", "sampling.weights", "sampling.first_segment",
              "sampling.shrink_factor", "verifier.workers", "verifier.sandbox", "verifier.hang_after", "verifier.on_hang",
              "verifier.load_timeout_s", "verifier.max_failing_steps",
              "optimizer.max_nonfinite_updates",
              "cold_start")  # a stage's cold_start.steps is always 0


def expand(cfg: ConfigDict) -> ConfigDict:
    """A GRPO config with `cold_start.steps > 0` as the pipeline `cold_start,grpo` (any other config
    as it is): the cold start is an SFT stage with the `cold_start` overrides."""
    if is_pipeline(cfg) or not cfg.cold_start.steps:
        return cfg
    if cfg.trainer != "grpo":
        raise ValueError(f"cold_start.steps={cfg.cold_start.steps} with trainer={cfg.trainer!r}: only a GRPO run "
                         "has a cold start")
    out = copy.deepcopy(cfg)
    with out.unlocked():
        out.stages = "cold_start,grpo"
        out.stage = {"cold_start": {"trainer": "sft", **cfg.cold_start.to_dict(), "cold_start": {"steps": 0}},
                     "grpo": {"cold_start": {"steps": 0}}}
    return out


def is_pipeline(cfg: ConfigDict) -> bool:
    return bool(cfg.get("stages"))


def stage_names(cfg: ConfigDict) -> list[str]:
    cfg = expand(cfg)
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    missing = [n for n in names if n not in cfg.get("stage", {})]
    if missing or len(set(names)) != len(names):
        raise ValueError(f"stages={cfg.stages!r}: every name must be unique and have a section in `stage`; "
                         f"missing {missing}, sections {sorted(cfg.get('stage', {}))}")
    return names


def _apply(target: ConfigDict, overrides: Any, where: str) -> None:
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in target:
            new = config.renamed(path)
            raise ValueError(f"stage override {path!r}: " + (f"renamed {new!r}" if new else
                             f"the config has no such field; fields here are {sorted(target.keys())}"))
        if isinstance(target[key], ConfigDict) and path not in _WHOLE:
            _apply(target[key], value, path)
        else:
            target[key] = value


def stage_config(cfg: ConfigDict, name: str) -> ConfigDict:
    """The full config of stage `name`: the shared fields, its overrides, its workdir, and the
    previous stage's workdir as `init_from` (the first stage keeps `cfg.init_from`)."""
    cfg = expand(cfg)
    names = stage_names(cfg)
    if name not in names:
        raise ValueError(f"no stage {name!r}; the stages are {names}")
    out = copy.deepcopy(cfg)
    with out.unlocked():
        del out["stages"], out["stage"]
        overrides = cfg.stage[name].to_dict() if isinstance(cfg.stage[name], ConfigDict) else dict(cfg.stage[name])
        _apply(out, overrides, "")
        i = names.index(name)
        out.workdir = os.path.join(cfg.workdir, name)
        out.resume = True
        if i > 0:
            out.init_from = os.path.join(cfg.workdir, names[i - 1])
            # The previous stage's final evaluation is of the same weights, when it evaluates.
            out.eval.at_start = not stage_config(cfg, names[i - 1]).eval.every
    config.check(out)
    if out.cold_start.steps:
        raise ValueError(f"stage {name!r}: cold_start.steps={out.cold_start.steps}; in a pipeline the cold "
                         "start is a stage of its own (trainer='sft')")
    return out


# The sections a trainer never reads: changing GRPO's settings after a finished cold start reuses it.
_UNUSED_BY = {"sft": ("grpo",), "grpo": ("sft",)}


def stage_settings(scfg: ConfigDict, legacy: bool = False) -> dict[str, Any]:
    """The settings of a stage config that decide what it trains, flat and JSON-ready
    ({"optimizer.learning_rate": 1e-4, ...}): the `_UNTRACKED` fields and the sections its trainer
    does not read (`_UNUSED_BY`; `legacy`: kept, as stage markers before them recorded) left out."""
    flat = config.flatten(json.loads(json.dumps(scfg.to_dict(), default=repr)))
    unused = () if legacy else _UNUSED_BY.get(scfg.get("trainer"), ())
    return _tracked({k: v for k, v in flat.items() if not any(k.startswith(u + ".") for u in unused)})


def _tracked(flat: dict[str, Any]) -> dict[str, Any]:
    # Without adapters (model.lora.rank 0) their other fields change nothing: they count at their
    # defaults, so a full cold start is the same stage under a LoRA config's shared fields.
    unused = () if flat.get("model.lora.rank") else ("model.lora.alpha", "model.lora.targets", "model.lora.dropout")
    return {k: v for k, v in flat.items()
            if k not in unused and not any(k == u or k.startswith(u + ".") for u in _UNTRACKED)}


def fingerprint(settings: dict[str, Any], previous: str = "") -> str:
    """A hash of a stage's settings chained with the previous stage's fingerprint."""
    text = json.dumps({"previous": previous, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_error(name: str, workdir: str, old: dict[str, Any], new: dict[str, Any], later: list[str]) -> ValueError:
    unused = tuple(u + "." for u in _UNUSED_BY.get(old.get("trainer", new.get("trainer")), ()))
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new))
             if old.get(k, "<unset>") != new.get(k, "<unset>") and not k.startswith(unused)]  # an old marker's
    what = ("settings changed since it finished: " + "; ".join(diffs)) if diffs else \
        "an earlier stage has changed (rerun) since it finished"
    return ValueError(
        f"stage {name!r} in {workdir}: {what}. A finished stage is not reused with other settings: delete "
        f"{workdir} to run it again from the start, or only {os.path.join(workdir, 'stage.json')} to continue "
        f"it from its last checkpoint (e.g. after raising steps)"
        + (f", together with the folders of the stages after it ({', '.join(later)})" if later else "")
        + "; or restore the settings.")


def resolve(cfg: ConfigDict, stage: str | None = None) -> ConfigDict:
    """A plain config as it is; a pipeline's stage `stage` (default: the last) - for scripts that
    evaluate, sample or export one run."""
    if not is_pipeline(expand(cfg)):
        if stage:
            raise ValueError(f"stage={stage!r} given, but the config has no stages")
        return cfg
    return stage_config(cfg, stage or stage_names(cfg)[-1])


def _legacy_layout(cfg: ConfigDict) -> str | None:
    """A message when cfg's workdir holds a run written before cold starts became a stage."""
    if is_pipeline(cfg) or not is_pipeline(expand(cfg)):
        return None
    old = checkpoint.directory(cfg.workdir)
    if old.is_dir() and not (storage.path(cfg.workdir) / "grpo").is_dir():
        return (f"{old} was written before the cold start became a stage of its own (grpo_jax 0.1): this "
                f"config now runs in {os.path.join(cfg.workdir, 'cold_start')} and {os.path.join(cfg.workdir, 'grpo')}. "
                f"Move {old} into {os.path.join(cfg.workdir, 'grpo')}/ to evaluate or continue it there, "
                "or start in a new workdir.")
    return None


def load_policy(cfg: ConfigDict, stage: str | None = None, step: int | None = None,
                hf: str | None = None) -> tuple[policy.Policy, ConfigDict, str]:
    """The policy of a run (a pipeline's stage, default the last) at checkpoint `step` (default:
    the latest), or of a Hugging Face folder / hub id `hf`, for scripts that evaluate, sample or
    export it: its parameters only, no training state. Returns (policy, the run's config, source)."""
    config.check(cfg)
    legacy = None if hf else _legacy_layout(cfg)
    if legacy:
        raise SystemExit(legacy)
    run = copy.deepcopy(resolve(cfg, stage))
    with run.unlocked():
        run.init_from = None
    try:
        pol, source = loading.load(run, workdir=None if hf else run.workdir, step=step, hf_path=hf)
    except FileNotFoundError:
        raise SystemExit(f"no checkpoint in {checkpoint.directory(run.workdir)}; train first, or pass --hf=FOLDER")
    return pol, run, source


def _final_eval(stage_run: trainer.Trainer, history: list[dict]) -> dict[str, float]:
    last = history[-1] if history else {}
    if last.get("step") == stage_run.cfg.steps and "eval/pass@1" in last:
        return {k: v for k, v in last.items() if k.startswith("eval/")}
    return stage_run.evaluate()


def _same_stage(name: str, workdir: str, record: dict[str, Any], stamps: str | tuple[str, ...]) -> bool:
    """Whether a finished stage's marker matches its settings now (its fingerprint is one of `stamps`:
    today's, or the one a marker written before `_UNUSED_BY` holds for the same settings)."""
    if "fingerprint" not in record:
        raise ValueError(
            f"stage {name!r} in {workdir}: its stage.json has no settings fingerprint, so it predates the stage "
            f"format of this grpo_jax and cannot be checked against the config. Delete {workdir} to run the stage "
            f"again, or start a new run from its parameters with --config.init_from={workdir}")
    return record["fingerprint"] in ((stamps,) if isinstance(stamps, str) else stamps)


def run(cfg: ConfigDict, until_stage: str | None = None,
        reward_fns: dict[str, Callable] | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    """Train `cfg`: a pipeline (or a GRPO config with a cold start) stage by stage, else one run.
    Returns the stages' records, or the run's history."""
    if is_pipeline(expand(cfg)):
        return run_pipeline(cfg, until_stage, reward_fns)
    if until_stage:
        raise ValueError("until_stage needs a pipeline config (one with `stages`, or a cold start)")
    with trainer.Trainer(cfg, reward_fns=reward_fns) as t:
        return t.run()


def run_pipeline(cfg: ConfigDict, until_stage: str | None = None,
                 reward_fns: dict[str, Callable] | None = None) -> list[dict[str, Any]]:
    """Run the stages in order (skipping finished ones), stopping after `until_stage` if given.

    Returns each finished stage's record (what stage.json holds): name, trainer, steps, seconds of
    the session that finished it, final evaluation, and the rejection-sampling summary if any.
    """
    legacy = _legacy_layout(cfg)
    if legacy:
        raise ValueError(legacy)
    names = stage_names(cfg)
    if until_stage is not None and until_stage not in names:
        raise ValueError(f"until_stage={until_stage!r}; the stages are {names}")
    for name in names:  # every stage's config checked before the first one starts
        config.check_mesh(stage_config(cfg, name), jax.device_count(), jax.process_count())
    lead = jax.process_index() == 0
    with workdir_lock.WorkdirLock(cfg.workdir) if lead else contextlib.nullcontext():
        return _run_stages(cfg, names, until_stage, reward_fns, lead)


def _run_stages(cfg: ConfigDict, names: list[str], until_stage: str | None, reward_fns, lead: bool) -> list[dict]:
    records, previous, previous_legacy = [], "", ""
    for i, name in enumerate(names):
        scfg = stage_config(cfg, name)
        settings = stage_settings(scfg)
        stamp = fingerprint(settings, previous)
        legacy = fingerprint(stage_settings(scfg, legacy=True), previous_legacy)  # markers of earlier versions
        marker = storage.path(scfg.workdir) / "stage.json"
        if marker.exists():
            record = storage.read_json(marker)
            if not _same_stage(name, scfg.workdir, record, (stamp, legacy)):
                raise _changed_error(name, scfg.workdir, record.get("settings", {}), settings, names[i + 1:])
            if lead:
                print(f"== stage {name}: finished earlier, skipped", flush=True)
        else:
            if lead:
                print(f"== stage {name} ({scfg.trainer}, {scfg.steps} steps"
                      + (f", from {scfg.init_from}" if scfg.init_from else "") + ")", flush=True)
            t0 = time.perf_counter()
            # Closing waits for the last checkpoint to be written: the next stage starts from it.
            with trainer.Trainer(scfg, reward_fns=reward_fns) as stage_run:
                history = stage_run.run()["history"]
                if stage_run.checkpoints.latest_step() != stage_run.step:
                    stage_run.save()
                record = {"name": name, "trainer": scfg.trainer, "steps": stage_run.step,
                          "eval": _final_eval(stage_run, history)}
                summary = storage.path(scfg.workdir) / "rejection_samples.summary.json"
                if summary.exists():
                    record["rejection_sampling"] = storage.read_json(summary)
                if scfg.trainer == "sft":
                    record["sft_sources"] = dict(stage_run.algorithm.sources)
            record.update(seconds=time.perf_counter() - t0, fingerprint=stamp, settings=settings)
            if lead:
                storage.write_text(marker, json.dumps(record, indent=2))
                print(f"== stage {name} done in {record['seconds']:.0f} s: "
                      + " ".join(f"{k}={v:.3f}" for k, v in record["eval"].items()), flush=True)
        records.append(record)
        previous, previous_legacy = stamp, legacy
        if name == until_stage:
            break
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the stages' final evaluations and times."""
    keys = sorted({k for r in records for k in r["eval"]}, key=lambda k: (k != "eval/pass@1", k))
    head = "| stage | trainer | steps | time | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    for r in records:
        lines.append(f"| {r['name']} | {r['trainer']} | {r['steps']} | {r['seconds']:.0f} s | "
                     + " | ".join(f"{r['eval'].get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)
