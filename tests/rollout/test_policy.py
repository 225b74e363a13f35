"""A policy on its own (evaluation, export, sampling) without training state; checkpoints and
workdirs of older formats stop with a message that says why."""

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.common import data
from grpo_jax.models import transformer
from grpo_jax.rewards import scoring
from grpo_jax.rollout import evaluation
from grpo_jax.rollout import policy
from grpo_jax.run import checkpoint
from grpo_jax.run import pipeline
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GRPO run of 2 steps (checkpointed at the end): its config, final parameters and evaluation."""
    cfg = tiny_config(tmp_path_factory.mktemp("run"), steps=2)
    cfg.eval.every = 0
    tr = trainer.Trainer(cfg)
    try:
        tr.run()
        return cfg, jax.device_get(tr.params), tr.evaluate()
    finally:
        tr.close()


def test_a_runs_policy_loads_without_training_state_or_random_init(trained, monkeypatch):
    cfg, params, scores = trained
    real_init = transformer.init_params

    def init_params(cfg, key):  # shapes (under eval_shape, traced) are fine; real random weights are not
        if not isinstance(key, jax.core.Tracer):
            pytest.fail("a checkpoint's policy needs no random init")
        return real_init(cfg, key)

    monkeypatch.setattr(transformer, "init_params", init_params)
    pol, run_cfg, source = pipeline.load_policy(cfg)
    assert source == f"{cfg.workdir} step 2" and run_cfg.workdir == cfg.workdir
    assert not hasattr(pol, "opt_state") and {f.name for f in pol.__dataclass_fields__.values()} == \
        {"params", "model_cfg", "tokenizer", "mesh", "prompt", "sampling", "sampling_weights", "merge_lora",
         "is_inference_copy", "tools"}  # tools: the multi-turn rollouts' tool runner (None here)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pol.params), params)
    held = jax.tree.leaves(pol.params)
    assert sum(x.nbytes for x in held) == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    # The parameters sit on the mesh with the model's shardings, as the trainer placed them.
    assert all(x.sharding.mesh == pol.mesh for x in held)
    # Evaluating it alone gives the trainer's figures; the verifier pool starts only to score.

    scorer = scoring.Scorer.from_config(run_cfg)
    assert scorer._pool is None
    got = evaluation.evaluate(pol, data.load_task(run_cfg.data, run_cfg.seed).eval, scorer, **evaluation.settings(run_cfg))
    scorer.close()
    assert got == scores


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*train first, or pass --hf"):
        pipeline.load_policy(tiny_config(tmp_path / "empty"))


def test_a_checkpoint_of_the_format_before_manifests_stops_in_one_line(trained, tmp_path):
    """grpo_jax 0.1 wrote the two items without a manifest (numpy int64 step and data position, the
    reference kept): a resume from it stops naming the checkpoint and what to do, and loads nothing."""
    cfg, params, _ = trained
    run = tiny_config(tmp_path, steps=3)
    run.eval.every, run.resume = 0, True
    first = trainer.Trainer(run)
    state = first.state
    old = {"opt_state": state.opt_state, "rng": state.rng, "step": np.asarray(2),
           "data": {"epoch": np.asarray(0), "position": np.asarray(4), "seed": np.asarray(run.seed)},
           "ref_params": state.ref_params}
    with ocp.CheckpointManager(checkpoint.directory(tmp_path), options=ocp.CheckpointManagerOptions(create=True)) as m:
        m.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params), state=ocp.args.StandardSave(old)))
        m.wait_until_finished()
    first.close()
    tr = trainer.Trainer(run)
    try:
        with pytest.raises(checkpoint.CheckpointError) as e:
            tr.restore()
        assert len(str(e.value).splitlines()) == 1
        assert "checkpoint 2" in str(e.value) and "has no manifest.json" in str(e.value)
        assert "--config.init_from" in str(e.value)
    finally:
        tr.close()


def test_a_cold_start_run_of_the_old_layout_stops_with_a_message(trained, tmp_path):
    """Before, a run with a cold start kept its checkpoints in WORKDIR/checkpoints; now the cold start
    and GRPO are stages in WORKDIR/cold_start and WORKDIR/grpo. Such a workdir is named, not reused."""
    import shutil

    cfg, _, _ = trained
    shutil.copytree(checkpoint.directory(cfg.workdir), checkpoint.directory(tmp_path))
    old = tiny_config(tmp_path)
    old.cold_start.steps = 3
    with pytest.raises(SystemExit, match="written before the cold start became a stage of its own.*Move"):
        pipeline.load_policy(old)
    with pytest.raises(ValueError, match="written before the cold start became a stage of its own"):
        pipeline.run(old)


def test_policy_samples_rows_in_batches_like_one_call(trained):
    cfg, _, _ = trained
    pol, run_cfg, _ = pipeline.load_policy(cfg)

    rows = data.load_task(run_cfg.data, run_cfg.seed).eval[:4]
    key = jax.random.key(3)
    import dataclasses

    greedy = dataclasses.replace(pol.sampling, greedy=True)
    whole = pol.sample(rows, 1, key, greedy)
    split = pol.sample(rows, 1, key, greedy, batch_size=2)
    assert whole.texts == split.texts and (whole.lengths == split.lengths).all()
    assert len(whole.texts) == 4 and whole.mean_logp.shape == (4,)
    # a row whose prompt is already token ids (data.template="tokens") samples the same text
    tokens = pol.replace(prompt=policy.PromptFormat("tokens", "ids"))
    again = tokens.sample([{"ids": ids} for ids in pol.prompt_ids(rows)], 1, key, greedy)
    assert again.texts == whole.texts
