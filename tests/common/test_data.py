"""Prompt data: synthetic tasks are verifiable, bad rows are skipped and counted, iteration resumes."""

import json

import pytest

from grpo_jax.common import data
from grpo_jax.rewards import checks
from grpo_jax.rewards import math_grader


def test_arithmetic_answers_are_right():
    rows = data.arithmetic_rows(200, seed=1)
    for r in rows:
        a, op, b = r["question"].removeprefix("What is ").rstrip("?").split()
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert math_grader.math_reward(f"#### {r['answer']}", r["answer"]) == 1.0
    assert data.arithmetic_rows(5, seed=1) == rows[:5]  # seeded


def test_countdown_problems_are_solvable():
    for r in data.countdown_rows(100, seed=2):
        assert checks.countdown_reward(f"<answer>{r['solution']}</answer>", r["numbers"], r["target"]) == 1.0


def test_local_jsonl_with_bad_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": None},
            {"question": "", "answer": "3"}, {"question": "3+3?"}, {"question": "4+4?", "answer": "8"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept, skipped = data.load_rows(str(path), required=("question", "answer"))
    assert [r["answer"] for r in kept] == ["2", "8"] and skipped == 3


def test_offline_hub_name_is_a_clear_error():
    with pytest.raises(ValueError, match="could not load dataset 'openai/gsm8k'"):
        data.load_rows("openai/gsm8k", config="main")
    with pytest.raises(ValueError, match="unknown synthetic dataset 'algebra'"):
        data.load_rows("synthetic:algebra")


def test_split_is_disjoint_and_seeded():
    rows = [{"i": i} for i in range(100)]
    train, held = data.split_rows(rows, 20, seed=3)
    assert len(train) == 80 and len(held) == 20
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert data.split_rows(rows, 20, seed=3)[1] == held and data.split_rows(rows, 20, seed=4)[1] != held


def test_iterator_resumes_exactly_and_shards_hosts():
    rows = [{"i": i} for i in range(23)]
    it = data.PromptIterator(rows, batch_size=4, seed=5)
    full = [[r["i"] for r in it.next()] for _ in range(12)]  # crosses two epoch boundaries
    it2 = data.PromptIterator(rows, batch_size=4, seed=5)
    for _ in range(5):
        it2.next()
    it3 = data.PromptIterator(rows, batch_size=4, seed=5)
    it3.restore(it2.state())
    assert [[r["i"] for r in it3.next()] for _ in range(7)] == full[5:]
    # Two hosts with half the batch each read disjoint rows that make up the one-host batch.
    h0 = data.PromptIterator(rows, batch_size=2, seed=5, host=0, num_hosts=2)
    h1 = data.PromptIterator(rows, batch_size=2, seed=5, host=1, num_hosts=2)
    for want in full[:8]:
        a, b = [r["i"] for r in h0.next()], [r["i"] for r in h1.next()]
        assert not set(a) & set(b) and sorted(a + b) == sorted(want)


def test_split_by_prompt_never_leaks_a_held_out_problem():
    rows = data.arithmetic_rows(2000, seed=0, digits=1, ops="+-")  # only 200 distinct problems
    train, held = data.split_rows(rows, 64, seed=0, key="question")
    held_q = [r["question"] for r in held]
    assert len(held_q) == len(set(held_q)) == 64
    assert not set(held_q) & {r["question"] for r in train}
    assert len({r["question"] for r in train}) == 200 - 64
    with pytest.raises(ValueError, match="distinct prompts"):
        data.split_rows(rows, 200, seed=0, key="question")


def test_saved_datasets_folder_and_parquet(tmp_path):
    import datasets

    rows = [{"question": "What is 1 + 1?", "completion": "#### 2"}, {"question": "", "completion": "#### 3"}]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.save_to_disk(str(tmp_path / "single"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    for source in ("dict", "single", "rows.parquet"):
        got, skipped = data.load_rows(str(tmp_path / source), required=("question", "completion"))
        assert (got, skipped) == (rows[:1], 1), source
    with pytest.raises(ValueError, match="'test'"):
        data.load_rows(str(tmp_path / "dict"), split="test")


def test_iterator_shuffles_once_per_epoch_and_its_batches_are_pure(monkeypatch):
    shuffles = []
    real = data.random.Random.shuffle
    monkeypatch.setattr(data.random.Random, "shuffle", lambda self, x: shuffles.append(len(x)) or real(self, x))
    rows = [{"i": i} for i in range(500_000)]
    it = data.PromptIterator(rows, batch_size=16, seed=1)
    for _ in range(100):
        it.next()
    assert shuffles == [500_000]  # one permutation for the epoch, not one per batch
    # batch(position) is a pure function of the position: the same position, the same rows.
    small = data.PromptIterator([{"i": i} for i in range(10)], batch_size=4, seed=2)
    state = small.state()
    first, after = small.batch(state)
    again, _ = small.batch(state)
    assert first == again and after == {"epoch": 0, "position": 4, "seed": 2}
    _, s = small.batch(after)
    third, s = small.batch(s)  # 8 + 4 > 10: the epoch's remainder is dropped, a new permutation starts
    assert s == {"epoch": 1, "position": 4, "seed": 2} and len(third) == 4
    with pytest.raises(ValueError, match="seed 3"):
        small.batch({**state, "seed": 3})
