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
and a fingerprint of them chained with the previous stage's: a finished stage whose settings (or an
earlier stage's) have changed since is an error naming the change, never silently reused.

    python scripts/train.py --config=configs/r1_pipeline.py --config.stage.grpo.steps=300
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

_WHOLE = {"rewards", "reward_functions", "rejection.rewards", "model.overrides"}  # replaced, not merged
# Settings that do not change what a stage trains: where it lives, logging, evaluation, checkpoint
# cadence, and how it executes (device mesh, rematerialisation, attention kernel, verifier processes).
# Changing them never invalidates a stage.
_UNTRACKED = ("workdir", "init_from", "resume", "log", "eval", "checkpoint", "mesh", "model.remat",
              "model.attention", "verifier.workers")


def is_pipeline(cfg: ConfigDict) -> bool:
    return bool(cfg.get("stages"))


def stage_names(cfg: ConfigDict) -> list[str]:
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
            raise ValueError(f"stage override {path!r}: the config has no such field; "
                             f"fields here are {sorted(target.keys())}")
        if isinstance(target[key], ConfigDict) and path not in _WHOLE:
            _apply(target[key], value, path)
        else:
            target[key] = value


def stage_config(cfg: ConfigDict, name: str) -> ConfigDict:
    """The full config of stage `name`: the shared fields, its overrides, its workdir, and the
    previous stage's workdir as `init_from` (the first stage keeps `cfg.init_from`)."""
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
            out.eval.at_start = False  # the previous stage's final evaluation is of the same weights
    if out.trainer not in ("grpo", "sft"):
        raise ValueError(f"stage {name!r}: trainer={out.trainer!r}; expected 'grpo' or 'sft'")
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_settings(scfg: ConfigDict) -> dict[str, Any]:
    """The settings of a stage config that decide what it trains, flat and JSON-ready
    ({"optimizer.learning_rate": 1e-4, ...}); `_UNTRACKED` fields are left out."""
    flat = _flat(json.loads(json.dumps(scfg.to_dict(), default=repr)))
    return {k: v for k, v in flat.items() if not any(k == u or k.startswith(u + ".") for u in _UNTRACKED)}


def fingerprint(settings: dict[str, Any], previous: str = "") -> str:
    """A hash of a stage's settings chained with the previous stage's fingerprint."""
    text = json.dumps({"previous": previous, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_error(name: str, workdir: str, old: dict[str, Any], new: dict[str, Any], later: list[str]) -> ValueError:
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
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
    if not is_pipeline(cfg):
        if stage:
            raise ValueError(f"stage={stage!r} given, but the config has no stages")
        return cfg
    return stage_config(cfg, stage or stage_names(cfg)[-1])


def load_policy(cfg: ConfigDict, stage: str | None = None, step: int | None = None, hf: str | None = None):
    """A read-only TrainerBase holding the policy of a run (a pipeline's stage, default the last)
    at checkpoint `step` (default: the latest), or of a Hugging Face folder / hub id `hf`, for
    scripts that evaluate, sample or export it. Returns (trainer, a description of the source)."""
    from grpo_jax.trainer import TrainerBase

    cfg = copy.deepcopy(resolve(cfg, stage))
    with cfg.unlocked():
        cfg.init_from = ""
        if hf:
            cfg.model.source = cfg.model.tokenizer = hf
    trainer = TrainerBase(cfg, readonly=True)
    if hf:
        return trainer, hf
    try:
        step = trainer.load_params(cfg.workdir, step)
    except FileNotFoundError:
        trainer.close()
        raise SystemExit(f"no checkpoint in {os.path.join(cfg.workdir, 'checkpoints')}; train first, or pass --hf=FOLDER")
    return trainer, f"{cfg.workdir} step {step}"


def make_trainer(cfg: ConfigDict, reward_fns: dict[str, Callable] | None = None):
    """The trainer that `cfg.trainer` names."""
    from grpo_jax.sft import SFTTrainer
    from grpo_jax.trainer import GRPOTrainer

    cls = {"grpo": GRPOTrainer, "sft": SFTTrainer}.get(cfg.trainer)
    if cls is None:
        raise ValueError(f"trainer={cfg.trainer!r}; expected 'grpo' or 'sft'")
    return cls(cfg, reward_fns=reward_fns)


def _final_eval(trainer, history: list[dict]) -> dict[str, float]:
    last = history[-1] if history else {}
    if last.get("step") == trainer.cfg.steps and "eval/pass@1" in last:
        return {k: v for k, v in last.items() if k.startswith("eval/")}
    return trainer.evaluate()


def run_pipeline(cfg: ConfigDict, until_stage: str | None = None,
                 reward_fns: dict[str, Callable] | None = None) -> list[dict[str, Any]]:
    """Run the stages in order (skipping finished ones), stopping after `until_stage` if given.

    Returns each finished stage's record (what stage.json holds): name, trainer, steps, seconds of
    the session that finished it, final evaluation, and the rejection-sampling summary if any.
    """
    names = stage_names(cfg)
    if until_stage is not None and until_stage not in names:
        raise ValueError(f"until_stage={until_stage!r}; the stages are {names}")
    lead = jax.process_index() == 0
    records, previous = [], ""
    for i, name in enumerate(names):
        scfg = stage_config(cfg, name)
        settings = stage_settings(scfg)
        stamp = fingerprint(settings, previous)
        marker = os.path.join(scfg.workdir, "stage.json")
        if os.path.exists(marker):
            with open(marker) as f:
                record = json.load(f)
            if record.get("fingerprint", stamp) != stamp:  # markers from before fingerprints: trusted
                raise _changed_error(name, scfg.workdir, record.get("settings", {}), settings, names[i + 1:])
            if lead:
                print(f"== stage {name}: finished earlier, skipped", flush=True)
        else:
            if lead:
                print(f"== stage {name} ({scfg.trainer}, {scfg.steps} steps"
                      + (f", from {scfg.init_from}" if scfg.init_from else "") + ")", flush=True)
            t0 = time.perf_counter()
            trainer = make_trainer(scfg, reward_fns)
            try:
                history = trainer.run()["history"]
                if trainer.ckpt.latest_step() != trainer.step:  # the next stage starts from it
                    trainer.save()
                record = {"name": name, "trainer": scfg.trainer, "steps": trainer.step,
                          "eval": _final_eval(trainer, history)}
                summary = os.path.join(scfg.workdir, "rejection_samples.summary.json")
                if os.path.exists(summary):
                    with open(summary) as f:
                        record["rejection_sampling"] = json.load(f)
                if scfg.trainer == "sft":
                    record["sft_sources"] = dict(trainer.sources)
            finally:
                trainer.close()
            record.update(seconds=time.perf_counter() - t0, fingerprint=stamp, settings=settings)
            if lead:
                with open(marker + ".tmp", "w") as f:
                    json.dump(record, f, indent=2)
                os.replace(marker + ".tmp", marker)
                print(f"== stage {name} done in {record['seconds']:.0f} s: "
                      + " ".join(f"{k}={v:.3f}" for k, v in record["eval"].items()), flush=True)
        records.append(record)
        previous = record.get("fingerprint", stamp)
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
