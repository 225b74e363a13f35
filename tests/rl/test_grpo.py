"""One GRPO step without a trainer: a function of the train state (plus the run's fixed pieces)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.common import data
from grpo_jax.common import metrics
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.rl import train_state
from grpo_jax.run import checkpoint
from grpo_jax.run import loading
from test_trainer import tiny_config  # noqa: E402


def test_a_step_is_a_function_of_the_state(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.optimizer.warmup_steps = 0
    pol, _ = loading.load(cfg)
    task = data.load_task(cfg.data, cfg.seed)
    scorer = scoring.Scorer(cfg.data.prompt_field, cfg.sampling.max_new_tokens, workers=-1,
                            fns={"math": lambda prompts, completions, **c: [sum(map(ord, t)) % 7 / 7 for t in completions]})
    algo = grpo.GRPO.from_config(cfg, pol.replace(params=None), scorer, task)
    start = jax.device_get(pol.params)
    state = train_state.create(pol.params, algo.tx, pol.mesh, seed=cfg.seed + 1, data=algo.initial_data(),
                               ref_params=algo.reference_params(pol.params))
    assert state.ref_params is not None  # beta > 0: the starting policy, a copy the updates never touch
    twin = jax.tree.map(jnp.copy, state)  # the step donates the state it is given

    clock = metrics.Stopwatch()
    after, m = algo.step(state, clock)
    again, m2 = algo.step(twin)
    assert int(after.step) == 1 and int(after.data["position"]) == cfg.grpo.prompts_per_step
    assert set(clock.laps) == {f"time/{k}_s" for k in ("sampling", "rewards", "ref_logprobs", "update")}
    # The same state gives the same next state and metrics: nothing else carries over between steps.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), jax.device_get(again))
    assert {k: v for k, v in m.items()} == {k: v for k, v in m2.items()}
    assert m["frac_reward_zero_std"] < 1 and m["update_skipped"] == 0.0
    # The policy moved; the reference is the starting policy still.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.ref_params), start)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(after.params)),
                                                         jax.tree.leaves(start)))


def test_a_checkpoint_holds_exactly_the_train_state(tmp_path):
    import dataclasses


    # Every field but `frozen` (a LoRA run's base) and `ref_params` (the KL reference: the starting
    # policy) is in the checkpoint; those two are rebuilt from their source by every run and checked
    # against the fingerprint the checkpoint records (tests/rl/test_lora_training.py, test_robustness.py).
    assert [f.name for f in dataclasses.fields(train_state.TrainState)] == \
        ["step", "params", "opt_state", "rng", "data", "ref_params", "frozen"]
    cfg = tiny_config(tmp_path)
    pol, _ = loading.load(cfg)
    algo = grpo.GRPO.from_config(cfg, pol.replace(params=None), scoring.Scorer("question", 6, workers=-1),
                                 data.load_task(cfg.data, cfg.seed))
    state = train_state.create(pol.params, algo.tx, pol.mesh, seed=1, data={"epoch": 2, "position": 6, "seed": 0},
                               ref_params=algo.reference_params(pol.params))
    state = state.replace(step=state.step + 5)
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1)
    try:
        ckpt.save(state)
        assert ckpt.latest_step() == 5
        like = jax.tree.map(jnp.zeros_like, state).replace(ref_params=state.ref_params)  # structure, dtypes, shardings
        back = ckpt.restore(like)
    finally:
        ckpt.close()
    assert not os.path.exists(os.path.join(checkpoint.directory(str(tmp_path)), "5", "state", "ref_params"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(state))
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_runs_with_the_same_settings_share_their_compiled_programs(tmp_path):
    """The update and the log-probability passes are jitted once for the module with hashable static
    settings (the optimizer is one object per setting): a second run in the same process compiles
    nothing that the first compiled, and other settings get programs of their own."""
    def run_one(workdir, lr):
        cfg = tiny_config(workdir, steps=1)
        cfg.optimizer.warmup_steps, cfg.optimizer.learning_rate = 0, lr
        pol, _ = loading.load(cfg)
        task = data.load_task(cfg.data, cfg.seed)
        scorer = scoring.Scorer(cfg.data.prompt_field, cfg.sampling.max_new_tokens, workers=-1,
                                fns={"math": lambda prompts, completions, **c: [len(t) % 3 / 2 for t in completions]})
        algo = grpo.GRPO.from_config(cfg, pol.replace(params=None), scorer, task)
        state = train_state.create(pol.params, algo.tx, pol.mesh, seed=cfg.seed, data=algo.initial_data(),
                                   ref_params=algo.reference_params(pol.params))
        algo.step(state)
        return algo

    first = run_one(tmp_path / "a", 1e-3)
    programs = (grpo.update_jit._cache_size(), grpo.batch_logprobs_jit._cache_size())
    second = run_one(tmp_path / "b", 1e-3)
    assert second.tx is first.tx and second.policy.mesh == first.policy.mesh
    assert (grpo.update_jit._cache_size(), grpo.batch_logprobs_jit._cache_size()) == programs
    third = run_one(tmp_path / "c", 2e-3)  # another learning rate: another optimizer, another update
    assert third.tx is not first.tx and grpo.update_jit._cache_size() == programs[0] + 1
