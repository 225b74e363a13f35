"""Pipelines of stages: per-stage configs, one stage starting from the previous one, and a two-stage
sft -> grpo run that resumes after an interruption between the stages exactly as if uninterrupted."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.run import loading
from grpo_jax.run import pipeline
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402


def two_stage(workdir):
    c = tiny_config(workdir, steps=2)
    c.eval.every, c.checkpoint.every = 0, 0  # the pipeline still saves each stage's end
    c.stages = "sft,grpo"
    c.stage = dict(sft=dict(trainer="sft", steps=3, sft=dict(data="demonstrations", batch_size=8),
                            optimizer=dict(learning_rate=3e-3)),
                   grpo=dict(trainer="grpo", steps=2, rewards={"math": 1.0, "brevity": 0.5},
                             reward_functions={"brevity": "test_pipeline:brevity"}))
    return c


def brevity(prompts, completions, **columns):
    """A user's reward function, named by import path in a stage's config."""
    return [1.0 / (1 + len(c)) for c in completions]


def params_of(workdir):
    """(step, parameters) of a run's latest checkpoint, read as a policy: no training state."""
    pol, source = loading.load(tiny_config(workdir), workdir=str(workdir))
    return int(source.rsplit(" ", 1)[1]), jax.device_get(pol.params)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_stage_configs_merge_overrides_and_chain_workdirs(tmp_path):
    c = two_stage(tmp_path)
    sft, grpo = pipeline.stage_config(c, "sft"), pipeline.stage_config(c, "grpo")
    assert sft.trainer == "sft" and sft.steps == 3 and sft.optimizer.learning_rate == 3e-3
    assert sft.optimizer.b2 == c.optimizer.b2 and sft.sft.batch_size == 8  # merged field by field
    assert sft.workdir == os.path.join(str(tmp_path), "sft") and sft.init_from is None and sft.resume
    assert grpo.init_from == sft.workdir and grpo.eval.at_start  # the sft stage evaluates nothing (eval.every=0)
    c.stage.sft.eval = {"every": 3}
    assert not pipeline.stage_config(c, "grpo").eval.at_start  # its last evaluation is of the same weights
    assert dict(grpo.rewards) == {"math": 1.0, "brevity": 0.5}  # replaced whole, not merged
    assert "stages" not in grpo and "stage" not in grpo
    assert pipeline.resolve(c).workdir == grpo.workdir and pipeline.resolve(c, "sft").workdir == sft.workdir
    bad = two_stage(tmp_path)
    bad.stage.grpo.optimizer = ConfigDict({"learning_rat": 1.0})
    with pytest.raises(ValueError, match="'optimizer.learning_rat'"):
        pipeline.stage_config(bad, "grpo")
    bad = two_stage(tmp_path)
    bad.stages = "sft,grpo,missing"
    with pytest.raises(ValueError, match="missing"):
        pipeline.stage_names(bad)


def test_two_stages_run_and_resume_between_stages_like_an_uninterrupted_run(tmp_path, capsys):
    full = pipeline.run_pipeline(two_stage(tmp_path / "full"))
    assert [r["name"] for r in full] == ["sft", "grpo"] and [r["steps"] for r in full] == [3, 2]
    assert list(full[0]["sft_sources"]) == ["demonstrations"] and "eval/pass@1" in full[1]["eval"]

    # The grpo stage started from the sft stage's final parameters.
    sft_step, sft_params = params_of(tmp_path / "full" / "sft")
    g = trainer.Trainer(pipeline.stage_config(two_stage(tmp_path / "full"), "grpo"))
    try:
        assert sft_step == 3 and g.source == f"{tmp_path / 'full' / 'sft'} step 3"
        assert_same(jax.device_get(g.params), sft_params)
    finally:
        g.close()

    # Interrupted after the first stage, then the same command again.
    part = two_stage(tmp_path / "part")
    first = pipeline.run_pipeline(part, until_stage="sft")
    assert [r["name"] for r in first] == ["sft"] and not os.path.exists(tmp_path / "part" / "grpo")
    capsys.readouterr()
    rest = pipeline.run_pipeline(part)
    assert "stage sft: finished earlier, skipped" in capsys.readouterr().out
    assert [r["eval"] for r in rest] == [r["eval"] for r in full]
    assert_same(params_of(tmp_path / "part" / "grpo")[1], params_of(tmp_path / "full" / "grpo")[1])
    assert "grpo" in pipeline.format_table(rest)

    # A finished stage whose settings changed is an error naming the change, not silently reused;
    # settings that do not change what a stage trains (evaluation, logging) do not count.
    changed = two_stage(tmp_path / "part")
    changed.stage.grpo.steps, changed.eval.k = 3, 2
    with pytest.raises(ValueError, match=r"stage 'grpo' .*steps: 2 -> 3\. .*delete"):
        pipeline.run_pipeline(changed)
    changed = two_stage(tmp_path / "part")
    changed.stage.sft.optimizer.learning_rate = 1e-3
    with pytest.raises(ValueError, match=r"stage 'sft' .*optimizer.learning_rate: 0.003 -> 0.001.*\(grpo\)"):
        pipeline.run_pipeline(changed)
    settings = pipeline.stage_settings(pipeline.stage_config(part, "grpo"))
    assert "workdir" not in settings and "eval.k" not in settings and settings["grpo.beta"] == part.grpo.beta
    assert pipeline.fingerprint(settings, "a") != pipeline.fingerprint(settings, "b")  # chained

    # The user's reward function was scored in the grpo stage.
    from grpo_jax.common.metrics import read_scalars

    scalars = read_scalars(str(tmp_path / "full" / "grpo" / "tb"))
    assert any(k.startswith("rewards/brevity") for k in scalars), sorted(scalars)


def test_train_script_runs_a_pipeline_until_a_stage(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={ROOT}/configs/r1_pipeline.py",
         f"--config.workdir={tmp_path}", "--until_stage=cold_start", "--config.stage.cold_start.steps=2",
         "--config.stage.cold_start.eval.every=0", "--config.eval.every=0", "--config.data.eval_size=8",
         "--config.eval.batch_size=8", "--config.verifier.workers=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.load(open(tmp_path / "cold_start" / "stage.json"))
    assert record["steps"] == 2 and record["trainer"] == "sft"
    assert "| cold_start | sft | 2 |" in out.stdout and not os.path.exists(tmp_path / "grpo")


def test_a_cold_start_is_an_sft_stage_checkpointed_and_resumed_like_any(tmp_path, capsys):
    """cold_start.steps > 0 in a GRPO config runs the SFT stage code (trainer="sft") in
    WORKDIR/cold_start, then GRPO in WORKDIR/grpo. Interrupted inside the cold start, the same
    command resumes it from its checkpoint and ends where the uninterrupted run does."""
    def cold(workdir):
        c = tiny_config(workdir, steps=2)
        c.eval.every, c.checkpoint.every = 0, 2
        c.cold_start.steps = 4
        return c

    full = pipeline.run(cold(tmp_path / "full"))
    assert [(r["name"], r["trainer"], r["steps"]) for r in full] == [("cold_start", "sft", 4), ("grpo", "grpo", 2)]
    assert list(full[0]["sft_sources"]) == ["demonstrations"]  # sft.data of the cold_start section
    assert pipeline.stage_config(cold(tmp_path), "cold_start").optimizer.b2 == 0.999  # its own optimizer

    part = cold(tmp_path / "part")
    stage = trainer.Trainer(pipeline.stage_config(part, "cold_start"))
    try:
        stage.run(until=2)  # killed after step 2 of the cold start, its checkpoint written
    finally:
        stage.close()
    assert os.path.isdir(tmp_path / "part" / "cold_start" / "checkpoints" / "2")
    capsys.readouterr()
    rest = pipeline.run(part)
    assert "resumed from step 2" in capsys.readouterr().out
    assert [r["steps"] for r in rest] == [4, 2]
    assert_same(params_of(tmp_path / "part" / "cold_start")[1], params_of(tmp_path / "full" / "cold_start")[1])
    assert_same(params_of(tmp_path / "part" / "grpo")[1], params_of(tmp_path / "full" / "grpo")[1])
    # evaluate.py and export_hf.py find the GRPO stage's policy in the same workdir.
    assert pipeline.resolve(part).workdir == str(tmp_path / "part" / "grpo")
