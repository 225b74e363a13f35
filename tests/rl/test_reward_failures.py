"""What a run does when a reward function fails: a weighted one that always fails stops it in one
line; one that hangs and only logs is disabled on every host and stays disabled after a resume."""

import os
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402


def sleeps(prompts, completions, **columns):
    time.sleep(3600)


def raises(prompts, completions, **columns):
    return [1 / 0 for _ in completions]


def test_a_weighted_function_that_fails_on_every_completion_stops_the_run_in_one_line(tmp_path):
    cfg = tiny_config(tmp_path, steps=6)
    cfg.rewards = {"math": 1.0, "broken": 1.0}
    cfg.verifier.max_failing_steps, cfg.eval.every = 2, 0
    tr = trainer.Trainer(cfg, reward_fns={"broken": raises})
    with pytest.raises(scoring.RewardFailure) as e:
        tr.run()
    tr.close(quiet=True)
    assert str(e.value) == ("step 2: reward 'broken' failed on every completion of 2 consecutive steps "
                            "(verifier.max_failing_steps=2): the run stops instead of training on zeros; "
                            "last error: ZeroDivisionError: division by zero")
    assert tr.step == 1  # stopped before step 2's update


def test_a_disabled_function_is_kept_in_the_checkpoint_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    def config(workdir):
        cfg = tiny_config(workdir, steps=4)
        cfg.rewards = {"math": 1.0, "slow": 0.0}  # weight 0: it only logs, so a hang disables it
        cfg.reward_functions = {"slow": "test_reward_failures:sleeps"}
        cfg.verifier.workers, cfg.verifier.timeout_s, cfg.verifier.hang_after = 1, 0.5, 2
        cfg.eval.every = 0
        return cfg

    straight = trainer.Trainer(config(tmp_path / "a"))
    hist = straight.run()["history"]
    straight.close()
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h.get("rewards/slow/timeouts", 0) > 0 for h in hist] == [True, False, False, False]
    assert int(straight.state.data["rewards_off"]) == 1 << straight.algorithm.reward_names.index("slow")

    first = trainer.Trainer(config(tmp_path / "b"))
    first.run(until=2)
    first.close()
    cfg = config(tmp_path / "b")
    cfg.resume = True
    resumed = trainer.Trainer(cfg)
    assert resumed.scorer.disabled == {}
    hist_b = resumed.run()["history"]
    resumed.close()
    assert "slow" in resumed.scorer.disabled  # from the checkpoint: never run again, never timed out
    assert [h["step"] for h in hist_b] == [3, 4] and not any("rewards/slow/timeouts" in h for h in hist_b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state), jax.device_get(resumed.state))


def test_what_one_host_disables_every_host_disables_at_the_end_of_the_step(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, steps=2)
    cfg.rewards = {"math": 1.0, "fmt": 0.0}
    cfg.eval.every = 0
    tr = trainer.Trainer(cfg, reward_fns={"fmt": lambda prompts, completions, **c: [0.0] * len(completions)})
    bit = 1 << tr.algorithm.reward_names.index("fmt")
    monkeypatch.setattr(grpo.multihost, "host_bits", lambda mask: mask | bit)  # another host disabled "fmt"
    tr.run(until=1)
    assert list(tr.scorer.disabled) == ["fmt"] and int(tr.state.data["rewards_off"]) == bit
    tr.close()
