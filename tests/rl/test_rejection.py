"""Rejection sampling keeps exactly the verified completions (a stub policy with known outputs) and
writes a dataset that the SFT trainer reads."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.rewards import scoring
from grpo_jax.rl import rejection
from grpo_jax.rollout import policy
from grpo_jax.run import trainer

ROWS = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 3?", "answer": "5"},
        {"question": "What is 9 + 9?", "answer": "18"}]
# Known outputs, 4 per problem: (text, tokens, truncated).
OUTPUTS = {
    "What is 1 + 1?": [("#### 2", 7, False), ("#### 3", 7, False), ("so #### 2", 10, False), ("#### 2", 7, False)],
    "What is 2 + 3?": [("#### 5", 7, True), ("#### 6", 7, False), ("#### 7", 7, False), ("5", 2, False)],
    "What is 9 + 9?": [("#### 18", 8, False), ("#### 18 ", 9, False), ("\\boxed{18}", 11, False), ("#### 81", 8, False)],
}
SCORER = scoring.Scorer(prompt_field="question", max_completion_length=16, workers=-1)  # the real verifier


class StubPolicy:
    """Returns the known outputs in place of a policy's samples."""

    def __init__(self):
        self.calls = []

    def sample(self, rows, n, key, sampling=None, batch_size=None):
        self.calls.append((len(rows), n))
        out = [OUTPUTS[r["question"]][i] for r in rows for i in range(n)]
        return policy.Completions([t for t, _, _ in out], np.array([n for _, n, _ in out]),
                                  np.array([c for _, _, c in out]), np.zeros(len(out)))


def test_keeps_exactly_the_verified_completions():
    kept, summary = rejection.rejection_sample(StubPolicy(), SCORER, ROWS, n=4, dedupe=False)
    # Verified and ended with EOS: "#### 2" twice and "so #### 2"; "#### 5" was cut off (truncated),
    # "5" has no final-answer marker; all three 18s (#### and \boxed{}).
    assert [(r["question"], r["completion"]) for r in kept] == [
        ("What is 1 + 1?", "#### 2"), ("What is 1 + 1?", "so #### 2"), ("What is 1 + 1?", "#### 2"),
        ("What is 9 + 9?", "#### 18"), ("What is 9 + 9?", "#### 18 "), ("What is 9 + 9?", "\\boxed{18}")]
    assert all(r["reward"] == 1.0 and r["answer"] for r in kept)
    assert kept[1]["length"] == 10
    assert summary["problems"] == 3 and summary["samples"] == 12 and summary["verified"] == 6
    assert summary["truncated"] == 1 and summary["problems_solved"] == 2 and summary["samples_kept"] == 6
    assert summary["mean_length_tokens"] == pytest.approx((7 + 10 + 7 + 8 + 9 + 11) / 6)


def test_dedupe_and_best_k():
    kept, summary = rejection.rejection_sample(StubPolicy(), SCORER, ROWS, n=4, dedupe=True)
    assert [r["completion"] for r in kept] == ["#### 2", "so #### 2", "#### 18", "\\boxed{18}"]
    assert summary["duplicates"] == 2  # the second "#### 2", and "#### 18 " (same text once stripped)
    kept, _ = rejection.rejection_sample(StubPolicy(), SCORER, ROWS, n=4, keep=1)
    assert [r["completion"] for r in kept] == ["#### 2", "#### 18"]  # the shortest of the best reward


def test_min_reward_and_other_reward_functions():
    kept, summary = rejection.rejection_sample(StubPolicy(), SCORER, ROWS, n=4, dedupe=False, min_reward=1.5,
                                               specs=[scoring.RewardSpec("math", 1.0),
                                                      scoring.RewardSpec("overlong", 1.0)])
    assert kept == [] and summary["problems_solved"] == 0  # math + overlong (0 here) never reaches 1.5


def test_written_dataset_is_what_sft_reads(tmp_path):
    from test_sft import sft_config

    kept, summary = rejection.rejection_sample(StubPolicy(), SCORER, ROWS, n=4)
    path = str(tmp_path / "rs.jsonl")
    rejection.write_dataset(kept, summary, path)
    assert json.load(open(rejection.summary_path(path)))["samples_kept"] == 4
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    cfg = sft_config(tmp_path / "run", path, steps=1)
    cfg.sft.batch_size = 4  # the whole dataset
    tr = trainer.Trainer(cfg)
    try:
        rows = tr.algorithm.examples(tr.state).rows
        assert [(r["question"], r["completion"]) for r in rows] == [(r["question"], r["completion"]) for r in kept]
        assert np.isfinite(tr.train_step()["loss"])
    finally:
        tr.close()


def test_sft_stage_samples_its_starting_policy_once(tmp_path):
    """`rejection_samples` in sft.data: the trainer samples its own starting policy, writes the
    dataset and summary into its workdir, and reads the file (not a new sample) when resumed."""
    from test_sft import sft_config

    cfg = sft_config(tmp_path, "rejection_samples,demonstrations", steps=1)
    cfg.rejection.n, cfg.rejection.max_problems, cfg.rejection.min_reward = 2, 8, 0.0  # keep whatever ended
    tr = trainer.Trainer(cfg)
    try:
        n_rows = len(tr.algorithm.examples(tr.state).rows)
        summary = json.load(open(tmp_path / "rejection_samples.summary.json"))
        assert summary["problems"] == 8 and summary["samples"] == 16
        assert tr.algorithm.sources["rejection_samples"] == summary["samples_kept"] == \
            16 - summary["truncated"] - summary["duplicates"]
        assert n_rows == summary["samples_kept"] + len(tr.task.train)
    finally:
        tr.close()
    with open(tmp_path / "rejection_samples.jsonl", "a") as f:  # a marker row: read back, not resampled
        f.write(json.dumps({"question": "marker", "answer": "0", "completion": "x"}) + "\n")
    tr = trainer.Trainer(cfg)
    try:
        assert tr.algorithm.examples(tr.state).rows[summary["samples_kept"]]["question"] == "marker"
    finally:
        tr.close()
