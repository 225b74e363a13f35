"""DAPO's dynamic sampling: batches of groups whose rewards differ, a cap on rounds, exact resume."""

import os
import re
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.common import metrics
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.rl import objective
from grpo_jax.run import trainer
from test_on_policy import _record, _setup, constant  # noqa: E402
from test_trainer import tiny_config  # noqa: E402


def odd_first_operand(prompts, completions, **columns):
    """No signal for prompts whose first number is even (every completion scores 0); the others score
    by their text, which differs within almost every group."""
    out = []
    for p, c in zip(prompts, completions):
        a = int(re.search(r"\d+", p).group())
        out.append(0.0 if a % 2 == 0 else sum(map(ord, c)) % 5 / 5)
    return out


def _algo(tmp_path, reward, rounds):
    cfg, _, algo, state = _setup(tmp_path, reward, dtype="float32", dynamic_sampling=True, max_sampling_rounds=rounds,
                                 prompts_per_step=4)
    return cfg, algo, state


def test_batches_hold_only_groups_with_signal(tmp_path):
    cfg, algo, state = _algo(tmp_path, odd_first_operand, rounds=8)
    seen = _record(algo)
    G, n = cfg.grpo.num_generations, cfg.grpo.prompts_per_step
    position = int(state.data["position"])
    total_rounds, sampled, smaller = 0, 0, 0
    for _ in range(3):
        state, m = algo.step(state)
        batch, out = seen[-1]
        rounds = int(m["dynamic_sampling/rounds"])
        total_rounds += rounds
        # Full batch, every group with signal: non-zero advantages in each, from prompts with odd a.
        # The batch's completions, whichever the layout (packed rows by default: empty slots aside).
        rows = objective.completions(batch)
        valid = np.asarray(rows.get("completion_valid", np.ones(len(rows["advantages"]), bool)))
        assert valid.sum() == n * G
        # A group with signal has at least two completions off its mean.
        assert (np.abs(np.asarray(rows["advantages"])[valid]) > 0).sum() >= 2 * n
        assert m["frac_reward_zero_std"] == 0.0 and m["dynamic_sampling/filled_without_signal"] == 0.0
        assert 0 < m["dynamic_sampling/kept_fraction"] <= 1 and out["update_skipped"] == 0.0
        assert rounds >= 1 and m["dynamic_sampling/kept_fraction"] <= 1
        sampled += int(m["dynamic_sampling/prompts_sampled"])
        smaller += int(m["dynamic_sampling/prompts_sampled"]) < rounds * n
    # Each round reads the next prompts: the first prompts_per_step, a later one about as many as
    # were missing (prompts_per_step / 2^k), not a whole batch again.
    assert int(state.data["position"]) - position == sampled
    assert total_rounds > 3  # about half the prompts have no signal: some steps needed a second round
    assert smaller >= 1 and sampled < total_rounds * n


def test_rounds_stop_at_the_cap(tmp_path):
    cfg, algo, state = _algo(tmp_path, constant, rounds=3)
    seen = _record(algo)
    state, m = algo.step(state)
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/kept_fraction"] == 0.0
    assert m["dynamic_sampling/filled_without_signal"] == 1.0
    assert int(state.data["position"]) == 3 * cfg.grpo.prompts_per_step
    (_, out), = seen
    assert out["update_no_signal"] == 1.0  # a full batch of groups without signal: no step
    with pytest.raises(ValueError, match="max_sampling_rounds=0"):
        grpo.GRPO(**{**{f: getattr(algo, f) for f in ("policy", "scorer", "specs", "prompts", "loss_cfg", "tx",
                                                       "num_generations")}, "max_sampling_rounds": 0})


def test_dynamic_sampling_resumes_bit_for_bit(tmp_path):
    def config(workdir):
        cfg = tiny_config(workdir, steps=4)
        cfg.grpo.dynamic_sampling, cfg.grpo.max_sampling_rounds, cfg.grpo.prompts_per_step = True, 4, 4
        cfg.rewards = {"odd": 1.0}
        cfg.grpo.dynamic_sampling_reward = "odd"
        cfg.eval.every, cfg.checkpoint.every = 0, 2
        return cfg

    fns = {"odd": odd_first_operand}
    straight = trainer.Trainer(config(tmp_path / "a"), reward_fns=fns)
    hist = straight.run()["history"]
    straight.close()
    assert max(h["dynamic_sampling/rounds"] for h in hist) > 1

    first = trainer.Trainer(config(tmp_path / "b"), reward_fns=fns)
    first.run(until=2)
    first.close()
    cfg = config(tmp_path / "b")
    cfg.resume = True
    resumed = trainer.Trainer(cfg, reward_fns=fns)
    hist_b = resumed.run()["history"]
    resumed.close()
    assert [h["step"] for h in hist_b] == [3, 4]
    for a, b in zip(hist[2:], hist_b):
        assert a["dynamic_sampling/rounds"] == b["dynamic_sampling/rounds"] and a["reward"] == b["reward"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state), jax.device_get(resumed.state))


def test_groups_are_kept_by_the_accuracy_function_not_the_weighted_total(tmp_path):
    """DAPO filters on accuracy: groups that are all wrong but differ in another weighted function
    (format, length) carry no accuracy signal and are not kept."""
    def accuracy(prompts, completions, **columns):  # 0 for every completion of an even first operand
        return odd_first_operand(prompts, completions)

    def length(prompts, completions, **columns):  # differs within almost every group
        return [len(c) % 3 / 3 for c in completions]

    for signal in ("math", "total"):
        cfg, _, algo, state = _setup(tmp_path / signal, accuracy, dtype="float32", dynamic_sampling=True,
                                     max_sampling_rounds=8, prompts_per_step=4, dynamic_sampling_reward=signal)
        algo.scorer.fns["length"] = length
        algo.specs = [*algo.specs, scoring.RewardSpec("length", 1.0)]
        G = cfg.grpo.num_generations
        even = []
        for _ in range(2):
            sampled, position, _ = algo._sample(state, metrics.Stopwatch())
            kept = algo._batch_groups(sampled)
            even += [int(re.search(r"\d+", r["question"]).group()) % 2 == 0 for r in kept.rows]
            assert len(kept.rows) == 4 and (signal == "total" or kept.signal(G, "math").all())
            state = state.replace(data={**state.data, **{k: np.int32(v) for k, v in position.items()}})
        # on the total, groups of even first operands (all wrong, lengths differ) are kept too
        assert (sum(even) == 0) == (signal == "math"), (signal, even)


def test_a_later_round_samples_only_what_is_missing_rounded_to_a_compiled_size(tmp_path):
    cfg, algo, state = _algo(tmp_path, odd_first_operand, rounds=4)
    assert [algo.round_size(m) for m in (1, 2, 3, 4)] == [1, 2, 4, 4]  # prompts_per_step=4: sizes 4, 2, 1


def test_dapo_config_uses_dynamic_sampling():
    from configs import dapo

    c = dapo.get_config()
    assert c.grpo.dynamic_sampling and c.grpo.max_sampling_rounds > 1
    # DAPO filters on accuracy: unset means eval.reward, the `math` function, not the weighted total
    assert c.grpo.dynamic_sampling_reward is None and c.eval.reward == "math" and "math" in c.rewards
