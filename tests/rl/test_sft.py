"""Supervised fine-tuning: the completion-only loss against an independent reference, exact
micro-batching, and the SFT trainer on prompt/completion files (cold start, distillation)."""

import dataclasses
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.models import architecture
from grpo_jax.models import tokenizer
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rl import sft
from grpo_jax.rl import train_state
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402

TOK = tokenizer.CharTokenizer()
PAIRS = [("What is 1 + 2?", "#### 3"), ("What is 47 + 8?", "#### 55"), ("Hi", "a much longer completion"),
         ("What is 9 - 9?", "")]


def tiny_model():
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=len(TOK), dtype="float32", param_dtype="float32")
    return transformer.init_params(cfg, jax.random.key(0)), cfg


def batch_of(pairs, max_tokens=32):
    comps, cut = sft.encode_completions(TOK, [c for _, c in pairs], TOK.eos_token_id, max_tokens)
    batch = sft.make_batch([TOK.encode(p) for p, _ in pairs], comps, TOK.pad_token_id, (16, 32), (8, 16, 32))
    return batch, cut


def reference_nll(params, cfg, pairs, width=48):
    """Mean NLL of completion+EOS tokens, one sequence at a time through the full forward.

    Each sequence starts at position 0 and is right-padded to `width` (one compile): under the causal
    mask the padding after it cannot change its logits."""
    forward = jax.jit(lambda p, seq: transformer.forward(p, cfg, seq, jnp.ones_like(seq, bool))[0])
    total, count = 0.0, 0
    for prompt, completion in pairs:
        p = TOK.encode(prompt)
        c = TOK.encode(completion, add_special_tokens=False) + [TOK.eos_token_id]
        seq = jnp.asarray([p + c + [0] * (width - len(p) - len(c))])
        logp = np.asarray(jax.nn.log_softmax(forward(params, seq)[0].astype(jnp.float32), -1), np.float64)
        # Targets are the completion tokens only: position t predicts token t + 1.
        total -= sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(c))
        count += len(c)
    return total / count


def test_loss_is_the_completion_token_nll_and_masks_prompt_and_padding():
    params, cfg = tiny_model()
    batch, cut = batch_of(PAIRS)
    assert cut == 0 and batch["completion_ids"].shape[1] == 32 and batch["prompt_ids"].shape[1] == 16
    tokens = batch["completion_mask"].sum()
    assert tokens == sum(len(c) + 1 for _, c in PAIRS)  # EOS is a target: the model learns to stop
    loss_terms = jax.jit(lambda p, b: sft.sft_loss_terms(p, cfg, b))
    loss = float(loss_terms(params, batch)) / tokens
    assert loss == pytest.approx(reference_nll(params, cfg, PAIRS), rel=1e-5)
    # Changing prompt tokens changes the context, never adds targets: the loss stays the reference's.
    other = [("Prompt " + p, c) for p, c in PAIRS]
    b2, _ = batch_of(other)
    assert b2["completion_mask"].sum() == tokens
    assert float(loss_terms(params, b2)) / tokens == pytest.approx(reference_nll(params, cfg, other), rel=1e-5)


def test_cut_completions_keep_no_eos():
    ids, cut = sft.encode_completions(TOK, ["abcdef", "ab"], TOK.eos_token_id, 4)
    assert cut == 1 and ids[0] == TOK.encode("abcd", add_special_tokens=False)
    assert ids[1] == TOK.encode("ab", add_special_tokens=False) + [TOK.eos_token_id]


def test_micro_batches_give_the_whole_batch_mean():

    params, cfg = tiny_model()
    batch, _ = batch_of(PAIRS)  # very different token counts per row: a mean of means would differ
    tx = optax.sgd(0.1)
    mesh = partitioning.make_mesh()
    outs = []
    for n in (1, 2, 4):
        state = train_state.create(jax.tree.map(jnp.copy, params), tx, mesh, seed=0,
                                   data={"epoch": 0, "position": 0, "seed": 0})
        state, m = jax.jit(lambda s, b, n=n: sft.update(s, b, model_cfg=cfg, tx=tx, num_microbatches=n))(state, batch)
        outs.append((float(m["loss"]), state.params))
    for loss, p in outs[1:]:
        assert loss == pytest.approx(outs[0][0], rel=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def write_pairs(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def sft_config(workdir, data, steps=30):
    c = tiny_config(workdir, steps=steps)
    c.trainer = "sft"
    c.sft.data, c.sft.batch_size = data, 8
    c.sampling.max_new_tokens = 10  # `#### 15` and its EOS fit uncut; evaluation decodes as far
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-3, 1, "constant"
    c.eval.every, c.checkpoint.every = 0, steps
    return c


def dataset_loss(tr):
    algo, pol = tr.algorithm, tr.current_policy()
    rows = algo.examples(tr.state).rows
    comps, _ = sft.encode_completions(pol.tokenizer, [r["completion"] for r in rows], pol.sampling.eos_ids[0], algo.max_tokens)
    batch = sft.make_batch(pol.prompt_ids(rows), comps, pol.sampling.pad_id, pol.sampling.prompt_buckets,
                           algo.completion_buckets)
    return float(sft.sft_loss_terms(pol.params, pol.model_cfg, batch)) / batch["completion_mask"].sum()


def test_sft_trainer_learns_a_teacher_file_and_skips_bad_rows(tmp_path):
    # A distillation file with its own completion field name; two rows lack what SFT needs.
    rows = [{"question": f"What is {a} + {b}?", "response": f"#### {a + b}"} for a in range(4) for b in range(4)]
    rows += [{"question": "What is 1 + 1?"}, {"question": "", "response": "#### 2"}]
    write_pairs(tmp_path / "teacher.jsonl", rows)
    cfg = sft_config(tmp_path / "run", str(tmp_path / "teacher.jsonl"), steps=120)
    cfg.sft.completion_field = "response"
    tr = trainer.Trainer(cfg)
    try:
        algo = tr.algorithm
        assert len(algo.examples(tr.state).rows) == 16 and algo.skipped_rows == 2
        assert algo.sources == {str(tmp_path / "teacher.jsonl"): 16}
        before = dataset_loss(tr)
        history = tr.run()["history"]
        after = dataset_loss(tr)
        assert after < 0.2 * before, (before, after)
        assert history[-1]["data/skipped_rows"] == 2 and history[-1]["frac_cut"] == 0.0
        assert tr.checkpoints.latest_step() == 120
        # Greedy decoding now writes the teacher's format (`#### N`) for every training prompt; the
        # random-weight model before training writes arbitrary characters.
        pol = tr.current_policy()
        texts = pol.sample(rows[:16], 1, jax.random.key(0), dataclasses.replace(pol.sampling, greedy=True)).texts
        assert all(re.fullmatch(r"#### \d+", t) for t in texts), texts
    finally:
        tr.close()


def test_sft_resume_reproduces_the_uninterrupted_run(tmp_path):
    def run(workdir, until=None, resume=False):
        cfg = sft_config(workdir, "demonstrations", steps=4)
        cfg.checkpoint.every, cfg.resume = 2, resume
        tr = trainer.Trainer(cfg)
        try:
            losses = [h["loss"] for h in tr.run(until=until)["history"]]
            return losses, jax.device_get(tr.params)
        finally:
            tr.close()

    full_losses, full = run(tmp_path / "full")
    first, _ = run(tmp_path / "part", until=2)
    rest, resumed = run(tmp_path / "part", resume=True)
    assert first + rest == full_losses
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
