"""Exact on-policy updates in bfloat16, the precision of the optimizer, and the failure policy."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.common import data
from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.rl import logprobs
from grpo_jax.rl import objective
from grpo_jax.rl import train_state
from grpo_jax.rollout import sampler
from grpo_jax.run import loading
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402


def varied(prompts, completions, **columns):
    """A reward that differs within most groups (so that there is signal)."""
    return [sum(map(ord, t)) % 7 / 7 for t in completions]


def constant(prompts, completions, **columns):
    return [0.5] * len(completions)


def _setup(tmp_path, reward=varied, dtype="bfloat16", **grpo_fields):
    cfg = tiny_config(tmp_path)
    cfg.model.dtype = dtype  # float32 master weights (model.param_dtype), bfloat16 compute
    cfg.optimizer.warmup_steps = 0
    cfg.grpo.update(grpo_fields)
    pol, _ = loading.load(cfg)
    task = data.load_task(cfg.data, cfg.seed)
    scorer = scoring.Scorer(cfg.data.prompt_field, cfg.sampling.max_new_tokens, workers=-1, fns={"math": reward})
    algo = grpo.GRPO.from_config(cfg, pol.replace(params=None), scorer, task)
    state = train_state.create(pol.params, algo.tx, pol.mesh, seed=cfg.seed + 1, data=algo.initial_data(),
                               ref_params=algo.reference_params(pol.params))
    return cfg, pol, algo, state


@pytest.fixture
def noisy_sampler(monkeypatch):
    """The sampler reports log-probabilities 0.1 too high at every odd position, as a sampler with
    other numerics (another dtype, kernel or engine) would: the trainer must not take them as π_old."""
    import dataclasses


    real = sampler.sample

    def sample(*args, **kwargs):
        r = real(*args, **kwargs)
        odd = (jnp.arange(r.logprobs.shape[1]) % 2 == 1)[None]
        return dataclasses.replace(r, logprobs=r.logprobs + 0.1 * (odd & r.mask))

    monkeypatch.setattr(sampler, "sample", sample)


def _record(algo):
    """Wrap the jitted update so that every batch and its metrics are kept."""
    seen, fn = [], algo.update_fn

    def recording(state, batch):
        state, out = fn(state, batch)
        seen.append((jax.device_get(batch), {k: float(v) for k, v in out.items()}))
        return state, out

    algo.update_fn = recording
    return seen


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bf16_single_update_has_ratio_exactly_one(tmp_path, level, noisy_sampler):
    """One update per rollout: π_old is π_θ under stop_gradient, so the ratio is exactly 1 whatever
    the sampler reported (GSPO too); the sampler's log-probabilities give the mismatch metrics."""
    cfg, pol, algo, state = _setup(tmp_path, importance_level=level)
    seen = _record(algo)
    state, m = algo.step(state)
    (batch, out), = seen
    assert "old_logp" not in batch  # never the sampler's
    assert out["ratio_min"] == 1.0 and out["ratio_max"] == 1.0 and out["clip_frac"] == 0.0
    mask = objective.completions(batch)["completion_mask"]  # [completions, C], whichever the layout
    odd = (np.arange(mask.shape[1]) % 2 == 1)[None] & mask
    assert m["mismatch/logp_abs_diff_mean"] == pytest.approx(0.1 * odd.sum() / mask.sum(), rel=1e-3)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(0.1, rel=1e-3)
    assert m["mismatch/token_mult_prob_error"] == pytest.approx(
        (np.exp(0.1) * odd.sum() + (mask.sum() - odd.sum())) / mask.sum(), rel=1e-4)
    assert out["update_skipped"] == 0.0


def test_several_updates_use_the_trainers_old_logprobs(tmp_path, noisy_sampler):
    """num_iterations=2, minibatches=2: π_old is recomputed once by the trainer's forward of the
    starting parameters, before the first update; the sampler's log-probabilities only feed metrics."""
    cfg, pol, algo, state = _setup(tmp_path, num_iterations=2, minibatches=2, beta=0.0)
    start = jax.tree.map(jnp.copy, state.params)
    seen = _record(algo)
    state, m = algo.step(state)
    assert len(seen) == 4
    for batch, _ in seen:
        # [B, C], or [R, S, C] slots of packed rows (grpo.packing, the default)
        trainer_logp = jax.jit(logprobs.batch_logprobs, static_argnums=1)(start, pol.model_cfg, batch)[0]
        mask = batch["completion_mask"]
        np.testing.assert_allclose(np.asarray(batch["old_logp"])[mask], np.asarray(trainer_logp)[mask], atol=1e-5)
        assert np.abs(batch["old_logp"] - batch["sampler_logp"])[mask].max() > 0.09  # not the sampler's
    first = seen[0][1]  # before any update, π_θ is π_old: the ratio is 1 up to float32 rounding
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert max(out["ratio_max"] for _, out in seen[1:]) > 1.0  # later updates move away from π_old


def test_a_batch_without_signal_changes_nothing(tmp_path):
    cfg, pol, algo, state = _setup(tmp_path, reward=constant, beta=0.04)
    state = state.replace(params=jax.tree.map(lambda x: x * 1.05, state.params))  # away from the reference
    before = jax.device_get((state.params, state.opt_state))
    seen = _record(algo)
    state, m = algo.step(state)
    assert m["frac_reward_zero_std"] == 1.0
    (_, out), = seen
    assert out["update_no_signal"] == 1.0 and out["update_skipped"] == 1.0 and out["update_nonfinite"] == 0.0
    assert out["grad_norm"] > 1e-3  # the KL term's gradient, which Adam would have turned into a full step
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before)
    assert int(state.step) == 1  # the step itself happened


def test_consecutive_nonfinite_updates_stop_the_run(tmp_path):
    cfg, pol, algo, state = _setup(tmp_path, dtype="float32")
    algo.nonfinite = train_state.NonFiniteStop(2)
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["final_norm"]["scale"] = jnp.full_like(poisoned["final_norm"]["scale"], jnp.nan)
    state = state.replace(params=poisoned)
    state, m = algo.step(state)  # the first is skipped ...
    assert m["update_nonfinite"] == 1.0 and m["update_skipped"] == 1.0
    with pytest.raises(FloatingPointError, match=r"2 consecutive updates had a non-finite loss or gradient.*"
                                                 r"optimizer.max_nonfinite_updates=2"):
        algo.step(state)  # ... the second stops the run
    streak = train_state.NonFiniteStop(3)
    for bad in (1, 1, 0, 1, 1):  # a finite update in between resets the count
        streak.observe(bad, 0)
    with pytest.raises(ValueError, match="max_nonfinite_updates=0"):
        train_state.NonFiniteStop(0)


# --------------------------------------------------------------------------------------------------
# Precision


def _opt_cfg(**kw):
    return ConfigDict(dict(dict(learning_rate=1e-3, warmup_steps=3, schedule="cosine", final_lr_fraction=0.1,
                                b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0), **kw))


def test_a_warm_up_longer_than_the_run_is_shortened_out_loud():
    with pytest.warns(UserWarning, match=r"optimizer.warmup_steps=10 does not fit the run's 5 optimizer updates: "
                                         r"the warm-up is shortened to 4"):
        _, lr = train_state.make_optimizer(_opt_cfg(warmup_steps=10), 5)
    assert float(lr(4)) == pytest.approx(1e-3)  # the last update at the full rate
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_state.make_optimizer(_opt_cfg(warmup_steps=4), 5)  # fits: nothing said


def test_optimizer_state_is_float32_for_bf16_weights_and_the_update_rounds_once():
    tx, _ = train_state.make_optimizer(_opt_cfg(warmup_steps=0, learning_rate=1e-2), 10)
    params = {"w": jnp.full((4,), 1.0, jnp.bfloat16), "b": jnp.zeros((2,), jnp.float32)}
    opt_state = tx.init(params)
    floats = {x.dtype for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}  # moments and hyperparameters, not bfloat16
    grads = {"w": jnp.asarray([1.0, -1.0, 0.5, 0.0], jnp.bfloat16), "b": jnp.ones((2,))}
    updates, _ = tx.update(grads, opt_state, params)
    assert updates["w"].dtype == jnp.float32
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.bfloat16
    # Adam's first step is -lr * sign(g) (after clipping), rounded once to bfloat16.
    want = (np.float32(1.0) - np.float32(1e-2) * np.sign(np.asarray(grads["w"], np.float32))).astype(jnp.bfloat16)
    assert len(set(want.tolist())) == 3  # representable steps: 0.99, 1, 1.01 round to three values
    np.testing.assert_array_equal(np.asarray(new["w"]), want)


def test_logged_learning_rate_is_the_one_the_update_used():
    tx, schedule = train_state.make_optimizer(_opt_cfg(), 10)
    state = train_state.TrainState(step=jnp.int32(0), params={"w": jnp.ones(3)}, opt_state=None, rng=None, data={})
    state = state.replace(opt_state=tx.init(state.params))
    used = []
    for k, skip in enumerate([False, False, True, False, False]):
        before = state
        state, m = train_state.apply_gradients(state, {"w": jnp.ones(3) * (k + 1)}, jnp.float32(0.0), tx,
                                               skip=jnp.asarray(skip))
        if skip:  # a skipped update leaves everything, the schedule's position included
            jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
        else:
            used.append(float(m["learning_rate"]))
    np.testing.assert_allclose(used, [float(schedule(i)) for i in range(4)], rtol=1e-6)
    assert used[1] > 0  # the warm-up's second rate


def test_bf16_storage_with_an_unrepresentable_learning_rate_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.dtype = cfg.model.param_dtype = "bfloat16"
    cfg.optimizer.learning_rate = 1e-6
    with pytest.raises(ValueError, match=r"optimizer.learning_rate=1e-06 .*model.param_dtype=bfloat16.*"
                                         r"model.param_dtype=float32"):
        trainer.Trainer(cfg)
    # The same weights at a rate bfloat16 can represent, and float32 master weights at any rate, train.
    params = transformer.init_params(architecture.SHAPES["tiny"].replace(vocab_size=64, param_dtype="bfloat16"), jax.random.key(0))
    train_state.check_precision(params, 1e-3)
    train_state.check_precision(jax.tree.map(lambda x: x.astype(jnp.float32), params), 1e-9)
    with pytest.raises(ValueError, match="100% of the parameters"):
        train_state.check_precision(params, 1e-6)


def test_reference_is_stored_in_the_compute_dtype(tmp_path):
    cfg, pol, algo, state = _setup(tmp_path, beta=0.04)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda r, p: np.testing.assert_array_equal(np.asarray(r), np.asarray(p.astype(jnp.bfloat16))),
                 state.ref_params, state.params)


def test_float32_optimizer_is_exactly_optax_adamw():
    """For float32 weights the float32 wrapper and the injected rate change no bit of AdamW's steps."""
    cfg = _opt_cfg()
    tx, schedule = train_state.make_optimizer(cfg, 20)
    plain = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    key = jax.random.key(0)
    start = {"w": jax.random.normal(key, (257,))}
    out = []
    for t in (tx, plain):
        p, s = start, t.init(start)
        step = jax.jit(t.update)
        for i in range(6):
            u, s = step({"w": jax.random.normal(jax.random.fold_in(key, i), (257,))}, s, p)
            p = optax.apply_updates(p, u)
        out.append(np.asarray(p["w"]))
    np.testing.assert_array_equal(out[0], out[1])
