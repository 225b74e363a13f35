"""The sampler against transformers' generate, teacher-forced log-probabilities, and the exact
temperature / top-k / top-p distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_model

from grpo_jax.models import hf
from grpo_jax.models import transformer
from grpo_jax.parallel import compiled
from grpo_jax.rl import logprobs
from grpo_jax.rollout import sampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_hf_model("qwen2")
    folder = tmp_path_factory.mktemp("tiny-sampler")
    model.save_pretrained(folder)
    params, cfg = hf.load_hf(folder)
    return model, params, cfg


def random_prompts(lengths, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(1, vocab, n))) for n in lengths]


def hf_generate(model, prompts, bucket, new, eos=None, pad=0):
    ids, mask = sampler.pad_prompts(prompts, (bucket,), pad)
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask.astype(np.int64)), max_new_tokens=new,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = out[:, bucket:].numpy()
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=pad)  # all rows stopped early


def test_greedy_matches_transformers_generate(tiny):
    model, params, cfg = tiny
    prompts = random_prompts([7, 3, 12, 1])
    sc = sampler.SamplingConfig(max_new_tokens=12, greedy=True, prompt_buckets=(16,))
    r = sampler.sample(params, cfg, prompts, 3, sc, jax.random.key(0))
    want = hf_generate(model, prompts, 16, 12)
    got = np.asarray(r.tokens)
    for g in range(3):  # the G copies of a prompt share its prefill and, greedy, its completion
        np.testing.assert_array_equal(got[g::3], want)
    assert np.all(np.asarray(r.lengths) == 12) and np.all(np.asarray(r.truncated))


def test_eos_stops_rows_and_pads_after(tiny):
    model, params, cfg = tiny
    prompts = random_prompts([5, 9, 2, 11], seed=3)
    free = np.asarray(sampler.sample(params, cfg, prompts, 1, sampler.SamplingConfig(max_new_tokens=10, greedy=True,
                                                                         prompt_buckets=(16,)), jax.random.key(0)).tokens)
    # Pick as EOS the first token some row emits for the first time after step 0, so that row stops early.
    row, step = next((i, t) for t in range(1, 8) for i in range(len(prompts)) if free[i, t] not in free[i, :t])
    eos = int(free[row, step])
    pad = 255
    sc = sampler.SamplingConfig(max_new_tokens=10, greedy=True, eos_ids=(eos, 254), pad_id=pad, prompt_buckets=(16,))
    r = sampler.sample(params, cfg, prompts, 1, sc, jax.random.key(0))
    got = np.asarray(r.tokens)
    np.testing.assert_array_equal(got, hf_generate(model, prompts, 16, 10, eos=[eos, 254], pad=pad))
    for i in range(len(prompts)):
        hits = np.flatnonzero(np.isin(free[i], [eos, 254]))
        length = hits[0] + 1 if hits.size else 10
        assert int(r.lengths[i]) == length
        assert bool(r.truncated[i]) == (hits.size == 0)
        np.testing.assert_array_equal(got[i, length:], pad)
        np.testing.assert_array_equal(np.asarray(r.mask[i]), np.arange(10) < length)
        np.testing.assert_array_equal(np.asarray(r.logprobs[i, length:]), 0.0)
    assert int(r.lengths[row]) == step + 1 and not bool(r.truncated[row])


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                      dict(temperature=1.3, top_p=0.8)])
def test_sampler_logprobs_equal_teacher_forced(tiny, settings):
    _, params, cfg = tiny
    prompts = random_prompts([6, 13, 2], seed=5)
    sc = sampler.SamplingConfig(max_new_tokens=9, eos_ids=(7,), prompt_buckets=(16,), **settings)
    r = sampler.sample(params, cfg, prompts, 4, sc, jax.random.key(2))
    lp, _ = logprobs.completion_logprobs(params, cfg, r.prompt_ids, r.prompt_mask, r.tokens, r.mask,
                                         temperature=sc.temperature)
    m = np.asarray(r.mask)
    np.testing.assert_allclose(np.asarray(r.logprobs)[m], np.asarray(lp)[m], atol=1e-4)


def test_reproducible_and_distinct_samples(tiny):
    _, params, cfg = tiny
    prompts = random_prompts([4, 8])
    sc = sampler.SamplingConfig(max_new_tokens=8, prompt_buckets=(16,))
    a = sampler.sample(params, cfg, prompts, 4, sc, jax.random.key(7))
    b = sampler.sample(params, cfg, prompts, 4, sc, jax.random.key(7))
    c = sampler.sample(params, cfg, prompts, 4, sc, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    group = np.asarray(a.tokens)[:4]
    assert len({tuple(row) for row in group}) == 4  # G samples of one prompt differ


def test_prompt_buckets_avoid_recompiles(tiny):
    _, params, cfg = tiny
    sc = sampler.SamplingConfig(max_new_tokens=4, prompt_buckets=(8, 16))
    sampler.sample(params, cfg, random_prompts([3, 5]), 2, sc, jax.random.key(0))
    before = sampler.compiled_programs()
    sampler.sample(params, cfg, random_prompts([7, 1], seed=1), 2, sc, jax.random.key(1))  # same bucket (8)
    assert sampler.compiled_programs() == before
    with pytest.raises(ValueError, match="prompt of 17 tokens is longer than the largest prompt bucket 16"):
        sampler.pad_prompts(random_prompts([17]), sc.prompt_buckets)


# ---- the sampling distribution -------------------------------------------------------------------


def expected_distribution(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted to the top-k, renormalised, then to the smallest set of most
    likely tokens whose mass reaches top_p, renormalised (the order transformers' warpers apply)."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for i in order:
        if mass >= top_p or p[i] == 0:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 5, 0.9)])
def test_empirical_token_frequencies(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0], np.float32)
    n = 40_000
    sc = sampler.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(1234), n)
    draw = jax.jit(jax.vmap(lambda k: sampler.choose_tokens(k[None], jnp.asarray(logits)[None], sc)[0][0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=len(logits))
    q = expected_distribution(logits.astype(np.float64), temperature, top_k, top_p)
    assert np.all(counts[q == 0] == 0), (counts, q)  # filtered tokens are never drawn
    kept = q > 0
    expected = n * q[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = float(jax.scipy.special.gammaincc(dof / 2, chi2 / 2)) if dof else 1.0
    assert p_value > 1e-3, (chi2, dof, counts, expected)


def test_candidates_equal_the_whole_vocabulary_filter():
    """The sampler's top-k / top-p candidates (lax.top_k, no sort of the vocabulary) keep exactly
    the tokens filter_logits keeps over the whole vocabulary, with the same logits."""
    logits = jax.random.normal(jax.random.key(3), (16, 300)) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.8), (40, 0.9), (0, 0.3)]:
        sc = sampler.SamplingConfig(top_k=top_k, top_p=top_p, top_p_candidates=300)
        vals, ids = sampler._candidates(logits, sc)
        dense = sampler.filter_logits(logits, top_k, top_p)
        got = jnp.full_like(logits, -jnp.inf).at[jnp.arange(16)[:, None], ids].set(vals)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dense))


def test_top_p_alone_is_capped_at_its_candidates():
    logits = jnp.zeros((1, 50))  # uniform: the 0.9 nucleus would be 45 tokens
    sc = sampler.SamplingConfig(top_p=0.9, top_p_candidates=10)
    keys = jax.random.split(jax.random.key(0), 2000)
    toks = jax.vmap(lambda k: sampler.choose_tokens(k[None], logits, sc)[0][0])(keys)
    assert len(set(np.asarray(toks).tolist())) == 10


def test_reported_logprob_is_the_tempered_one():
    logits = jnp.asarray([[3.0, 1.0, 0.0, -2.0]])
    sc = sampler.SamplingConfig(temperature=0.5, top_k=2)
    tok, lp = sampler.choose_tokens(jax.random.key(0)[None], logits, sc)
    want = jax.nn.log_softmax(logits / 0.5)[0, int(tok[0])]
    assert float(lp[0]) == pytest.approx(float(want), abs=1e-6)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="top_p=1.5"):
        sampler.SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        sampler.SamplingConfig(temperature=0)


# ---- the real model ------------------------------------------------------------------------------


def test_smollm2_greedy_matches_transformers(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    params, cfg = hf.load_hf(smollm2_dir)
    questions = ["What is 2 + 3?", "Name a color of the sky.", "Say hi."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sc = sampler.SamplingConfig(max_new_tokens=16, greedy=True, eos_ids=(eos,), pad_id=pad, prompt_buckets=(64,))
    r = sampler.sample(params, cfg, prompts, 1, sc, jax.random.key(0))
    want = hf_generate(model, prompts, 64, 16, eos=eos, pad=pad)
    np.testing.assert_array_equal(np.asarray(r.tokens), want)
    texts = tok.batch_decode(np.asarray(r.tokens), skip_special_tokens=True)
    assert all(t.strip() for t in texts), texts


def test_decode_segments_read_the_filled_cache_and_keep_the_tokens(tiny):
    """decode's segments attend over prompt + segment-end slots (the shapes of the compiled loop), and
    give the same sampled tokens and log-probabilities as decoding step by step over the whole cache."""
    _, params, cfg = tiny
    T, P = 300, 16
    sc = sampler.SamplingConfig(max_new_tokens=T, temperature=0.7, prompt_buckets=(P,))
    assert sampler.segment_ends(T) == (128, 256, 300)
    ids, mask = (jnp.asarray(a) for a in sampler.pad_prompts(random_prompts([5, 16]), (P,)))
    logits, cache = sampler.prefill(params, ids, mask, cfg=cfg, num_generations=1, max_new_tokens=T)
    text = sampler.decode_program(params, cache, logits, cfg=cfg, sampling=sc, kv_len=P + 128).compile().as_text()
    reads = set()
    for ins in compiled.Program(text).instructions():
        for a in ins.result:  # attention probabilities [B, kv_heads, group, 1, kv_len]
            if len(a.shape) == 5 and a.shape[:2] == (2, cfg.num_kv_heads) and a.shape[3] == 1 and a.shape[4] > P:
                reads.add(a.shape[-1])
    assert reads == {P + 128}, reads
    key = jax.random.key(7)
    out = sampler.decode(params, cache, logits, key, cfg=cfg, sampling=sc)
    assert sorted({(n, kv) for n, kv, _ in out.batches}) == [(2, P + 128), (2, P + 256), (2, P + 300)], out.batches
    assert out.row_steps == 2 * T

    # reference: the same draws, each step attending over every slot of the cache
    logits, cache = sampler.prefill(params, ids, mask, cfg=cfg, num_generations=1, max_new_tokens=T)
    step = jax.jit(lambda c, t, a: transformer.forward(params, cfg, t[:, None], a[:, None], c))
    want_tok, want_lp = [], []
    for s in range(T):
        tok, lp = sampler.choose_tokens(sampler._row_keys(key, jnp.arange(2), s), logits, sc)
        want_tok.append(tok), want_lp.append(lp)
        out_logits, cache = step(cache, tok, jnp.ones((2,), bool))
        logits = out_logits[:, -1]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(want_tok, 1))
    np.testing.assert_allclose(np.asarray(out.logps), np.stack(want_lp, 1), atol=1e-5)


def test_batch_sizes_step_down_by_the_factor_in_multiples_of_the_shards():
    assert sampler.batch_sizes(32, 1.5) == (32, 22, 15, 10, 7, 5, 4, 3, 2, 1)
    assert sampler.batch_sizes(64, 2.0, unit=8) == (64, 32, 16, 8)
    assert sampler.batch_sizes(24, 1.5, unit=8) == (24, 16, 8)
    assert sampler.batch_sizes(32, 1.0) == (32,)
    with pytest.raises(ValueError, match="shrink_factor=0.5"):
        sampler.SamplingConfig(shrink_factor=0.5)


def test_finished_rows_leave_the_batch_and_no_completion_changes(tiny):
    """EOS forced at spread lengths: the batch shrinks as rows finish (fewer computed row-steps, sizes
    from batch_sizes), and every row's tokens are those of the whole static batch: each row draws
    from its own stream, whatever batch it runs in."""
    _, params, cfg = tiny
    T, P, N = 160, 8, 24
    eos = 3  # drawn often by the tiny random model: a forced row does not end at a drawn EOS
    eos_at = np.random.default_rng(1).integers(1, T + 1, N)
    eos_at[:3] = (T, 1, T - 40)  # one row runs to the end, one stops at once
    ids, mask = (jnp.asarray(a) for a in sampler.pad_prompts(random_prompts([3, 8, 5]), (P,)))
    got = {}
    for factor in (1.0, 1.5):
        sc = sampler.SamplingConfig(max_new_tokens=T, eos_ids=(eos,), prompt_buckets=(P,), shrink_factor=factor)
        logits, cache = sampler.prefill(params, ids, mask, cfg=cfg, num_generations=8, max_new_tokens=T)
        got[factor] = sampler.decode(params, cache, logits, jax.random.key(5), cfg=cfg, sampling=sc, eos_at=eos_at)
    static, shrunk = got[1.0], got[1.5]
    np.testing.assert_array_equal(np.asarray(shrunk.tokens), np.asarray(static.tokens))
    np.testing.assert_array_equal(np.asarray(shrunk.lengths), np.asarray(static.lengths))
    np.testing.assert_array_equal(np.asarray(shrunk.done), np.asarray(static.done))
    np.testing.assert_allclose(np.asarray(shrunk.logps), np.asarray(static.logps), atol=1e-5)
    lengths = np.asarray(static.lengths)
    np.testing.assert_array_equal(lengths, eos_at)
    assert np.asarray(static.tokens)[np.arange(N), lengths - 1].tolist() == [eos] * N  # every row ended with EOS
    sizes = [n for n, _, _ in shrunk.batches]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 3 and set(sizes) <= set(sampler.batch_sizes(N, 1.5))
    assert static.row_steps == N * T and shrunk.row_steps < 0.7 * static.row_steps
    assert shrunk.row_steps == sum(n * steps for n, _, steps in shrunk.batches)
