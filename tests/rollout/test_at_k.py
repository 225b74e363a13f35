"""Test-time scaling estimators against hand-computed cases, closed forms and brute force."""

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.rollout import at_k
from grpo_jax.run import trainer


def brute_force(n, k, fn):
    """Mean of fn(subset) over every k-subset of range(n), subsets in sample order."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(fn(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_its_closed_form_and_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [i < c for i in range(n)]
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert at_k.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert at_k.pass_at_k(n, c, k) == pytest.approx(
                    brute_force(n, k, lambda s: any(correct[i] for i in s)), abs=1e-12)
    assert at_k.pass_at_k(16, 0, 8) == 0.0 and at_k.pass_at_k(16, 9, 8) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        at_k.pass_at_k(4, 1, 5)


def test_majority_vote_hand_computed_cases():
    answers, correct = ["3", "5", "3", "", "5"], [True, False, True, False, False]
    assert at_k.majority_vote(answers) == "3"  # 2 votes each: the answer given first wins
    assert at_k.majority_vote(["", ""]) is None
    assert at_k.majority_correct(answers, correct)
    assert not at_k.majority_correct(["5", "3", "5"], [False, True, False])
    assert at_k.maj_at_k(answers, correct, 5) == 1.0
    assert at_k.maj_at_k(answers, correct, 1) == pytest.approx(2 / 5)  # maj@1 is the sampled accuracy
    # k = 2, the ten pairs by hand: {0,1} 3  {0,2} 3  {0,3} 3  {0,4} 3  {1,2} 5 (first)  {1,3} 5
    # {1,4} 5  {2,3} 3  {2,4} 3  {3,4} 5  -> 6 of 10 majorities are the correct "3".
    assert at_k.maj_at_k(answers, correct, 2) == pytest.approx(0.6)
    assert at_k.maj_at_k(["", "", ""], [False] * 3, 2) == 0.0


def test_maj_at_k_exact_and_monte_carlo_agree_with_enumeration():
    rng = np.random.default_rng(0)
    answers = [str(x) for x in rng.integers(0, 4, 16)]
    answers[3] = ""
    correct = [a == "2" for a in answers]
    exact = brute_force(16, 8, lambda s: at_k.majority_correct([answers[i] for i in s], [correct[i] for i in s]))
    assert at_k.maj_at_k(answers, correct, 8, trials=20000) == pytest.approx(exact, abs=1e-12)  # enumerates
    assert at_k.maj_at_k(answers, correct, 8, trials=2000) == pytest.approx(exact, abs=0.03)  # samples
    for k in (1, 2, 3):
        assert at_k.maj_at_k(answers, correct, k) == pytest.approx(brute_force(
            16, k, lambda s: at_k.majority_correct([answers[i] for i in s], [correct[i] for i in s])), abs=1e-12)


def test_best_of_k_matches_enumeration_and_is_pass_at_k_when_the_verifier_picks():
    rng = np.random.default_rng(1)
    for n in (1, 5, 9):
        scores = rng.integers(0, 3, n).astype(float)  # many ties: the earliest sample wins them
        correct = rng.random(n) < 0.4
        for k in range(1, n + 1):
            def pick(s):
                best = max(s, key=lambda i: (scores[i], -i))
                return correct[best]
            assert at_k.best_of_k(scores, correct, k) == pytest.approx(brute_force(n, k, pick), abs=1e-12)
            assert at_k.best_of_k(correct.astype(float), correct, k) == pytest.approx(
                at_k.pass_at_k(n, int(correct.sum()), k), abs=1e-12)


def test_scaling_curve_rows():
    correct = np.array([[True, False, False, False], [False, False, False, False]])
    answers = [["1", "2", "2", "3"], ["", "", "", ""]]
    curve = at_k.scaling_curve(correct, answers, {"first": np.array([[4.0, 3, 2, 1], [0, 0, 0, 0]])})
    assert [r["k"] for r in curve] == [1, 2, 4]
    assert at_k.default_ks(12) == [1, 2, 4, 8, 12]
    assert curve[0]["pass@k"] == pytest.approx(1 / 8) and curve[-1]["pass@k"] == pytest.approx(0.5)
    assert curve[-1]["maj@k"] == 0.0  # "2" wins the vote of all four
    assert curve[-1]["best@k/first"] == pytest.approx(0.5)  # the top-scored sample is the correct one


def test_script_on_a_trained_checkpoint_writes_table_and_plot(tmp_path):
    from test_trainer import tiny_config


    cfg = tiny_config(tmp_path, steps=1)
    cfg.eval.every = 0
    tr = trainer.Trainer(cfg)
    tr.run()
    tr.close()
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "test_time_scaling.py"), f"--config={ROOT}/configs/base.py",
         f"--config.workdir={tmp_path}", "--config.steps=1", "--config.data.digits=1", "--config.data.ops=+",
         "--config.data.synthetic_size=200", "--config.data.eval_size=8", "--config.sampling.max_new_tokens=6",
         "--config.verifier.workers=-1", "--config.eval.batch_size=8", "--n=4", "--select=logprob,math",
         f"--output={tmp_path}/tts.json", f"--plot={tmp_path}/tts.png"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.load(open(tmp_path / "tts.json"))
    assert [r["k"] for r in result["curve"]] == [1, 2, 4] and result["problems"] == 8
    for r in result["curve"]:  # picking by the verifier is pass@k
        assert r["best@k/math"] == pytest.approx(r["pass@k"], abs=1e-12)
    assert "| k | pass@k | maj@k | best@k/logprob | best@k/math |" in out.stdout
    assert os.path.getsize(tmp_path / "tts.png") > 1000
