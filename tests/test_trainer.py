"""The training loop end to end on a tiny model: metrics, checkpoints, evaluation, resume, overrides."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import base  # noqa: E402
from grpo_jax import trainer as T  # noqa: E402


def tiny_config(workdir, steps=3):
    c = base.get_config()
    c.workdir = str(workdir)
    c.steps = steps
    c.data.digits, c.data.ops, c.data.synthetic_size, c.data.eval_size = 1, "+", 200, 8
    c.grpo.prompts_per_step, c.grpo.num_generations, c.grpo.max_new_tokens = 2, 4, 6
    c.sft.steps, c.sft.batch_size, c.sft.learning_rate = 3, 8, 1e-3
    c.optimizer.learning_rate = 1e-3
    c.eval.every, c.eval.k, c.eval.batch_size = 2, 2, 8
    c.checkpoint.every = 2
    c.log.samples_every = 1
    c.verifier.workers = -1  # score in process: the pool is tested on its own
    return c


def test_end_to_end_writes_metrics_checkpoints_and_evaluates(tmp_path):
    tr = T.Trainer(tiny_config(tmp_path))
    out = tr.run()
    tr.close()
    hist = out["history"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm", "reward", "frac_reward_zero_std",
                "sampler_logp_abs_diff", "rewards/math/mean", "completion_length/mean", "learning_rate"):
        assert key in hist[-1], key
    assert hist[-1]["sampler_logp_abs_diff"] < 1e-4  # sampler and trainer agree
    assert "eval/pass@1" in hist[0] and "eval/maj@2" in hist[2] and "eval/pass@2" in hist[-1]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 3]
    from grpo_jax.metrics import read_scalars

    scalars = read_scalars(str(tmp_path / "tb"))
    assert {"reward", "loss", "eval/pass_1", "rewards/math/mean"} <= set(scalars)  # TensorBoard spells @ as _
    assert [s for s, _ in scalars["reward"]] == [1, 2, 3]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = T.Trainer(tiny_config(tmp_path / "full", steps=4))
    full.cfg.eval.every = 0
    h_full = full.run()["history"]
    p_full = jax.device_get(full.params)
    full.close()

    part = T.Trainer(tiny_config(tmp_path / "part", steps=4))
    part.cfg.eval.every = 0
    part.run(until=2)  # interrupted after step 2 (checkpointed there)
    part.close()
    cfg = tiny_config(tmp_path / "part", steps=4)
    cfg.eval.every, cfg.resume = 0, True
    resumed = T.Trainer(cfg)
    h_res = resumed.run()["history"]
    assert resumed.step == 4 and [h["step"] for h in h_res] == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), p_full)
    for a, b in zip(h_res, h_full[2:]):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"]
    resumed.close()


def test_non_finite_update_is_skipped(tmp_path):
    tr = T.Trainer(tiny_config(tmp_path, steps=1))
    before = jax.device_get(tr.params)
    batch = {"prompt_ids": np.ones((2, 4), np.int32), "prompt_mask": np.ones((2, 4), bool),
             "completion_ids": np.ones((2, 3), np.int32), "completion_mask": np.ones((2, 3), bool),
             "advantages": np.array([np.nan, 1.0], np.float32), "old_logp": np.zeros((2, 3), np.float32),
             "ref_logp": np.zeros((2, 3), np.float32)}
    tr.params, tr.opt_state, m = tr._update(tr.params, tr.opt_state, batch)
    assert float(m["update_skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tr.params), before)
    tr.close()


def test_pass_at_k_unbiased_estimator():
    assert T.pass_at_k(4, 0, 2) == 0.0 and T.pass_at_k(4, 4, 1) == 1.0
    assert T.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert T.pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))


def test_command_line_overrides_and_typos(tmp_path):
    script = os.path.join(ROOT, "scripts", "train.py")
    r = subprocess.run([sys.executable, script, "--config.grpo.num_generashuns=4"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "num_generashuns" in r.stderr
    r = subprocess.run([sys.executable, script, "--config.steps=abc"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "steps" in r.stderr
    r = subprocess.run([sys.executable, script, "--config.steps=1", "--config.sft.steps=1", "--config.eval.every=0",
                        "--config.grpo.prompts_per_step=2", "--config.grpo.num_generations=2",
                        f"--config.workdir={tmp_path / 'run'}", "--config.verifier.workers=-1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1/1" in r.stdout and "cold start: 1 SFT steps" in r.stdout
