"""Log-probabilities through the model, micro-batching, memory, and the mesh-partitioned loss."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import left_padded_batch, tiny_hf_model

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import transformer
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss
from grpo_jax.rl import objective


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_log_softmax(chunk, temperature):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(3, 11)))

    def full(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w) / temperature
        lp = jax.nn.log_softmax(logits)
        return jnp.take_along_axis(lp, targets[..., None], -1)[..., 0], -(jnp.exp(lp) * lp).sum(-1)

    def chunked(h, w):
        return logprobs.token_logprobs(h, w, targets, temperature, chunk, with_entropy=True)

    (a, ea), (b, eb) = full(hidden, head), chunked(hidden, head)
    np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_allclose(eb, ea, atol=1e-5)
    # Gradients through the rematerialised scan equal the direct ones.
    ga = jax.grad(lambda h, w: full(h, w)[0].sum(), argnums=(0, 1))(hidden, head)
    gb = jax.grad(lambda h, w: chunked(h, w)[0].sum(), argnums=(0, 1))(hidden, head)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(y, x, atol=1e-5)


def test_completion_logprobs_match_transformers(tmp_path):
    hf_model = tiny_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path)
    params, cfg = hf.load_hf(tmp_path)
    prompts, pmask = left_padded_batch(cfg.vocab_size, [6, 3, 5])
    rng = np.random.default_rng(1)
    comp = rng.integers(1, cfg.vocab_size, size=(3, 5))
    cmask = np.arange(5)[None] < np.array([[5], [2], [4]])
    T = 0.7
    lp, ent = logprobs.completion_logprobs(params, cfg, jnp.asarray(prompts), jnp.asarray(pmask), jnp.asarray(comp),
                                           jnp.asarray(cmask), temperature=T, chunk=4, with_entropy=True)
    ids = np.concatenate([prompts, comp], 1)
    mask = np.concatenate([pmask, cmask], 1)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64))).logits
    ref = torch.log_softmax(logits[:, prompts.shape[1] - 1:-1] / T, -1)
    want = torch.gather(ref, -1, torch.as_tensor(comp)[..., None])[..., 0].numpy()
    want_ent = -(ref.exp() * ref).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(lp)[cmask], want[cmask], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[cmask], want_ent[cmask], atol=1e-4)


def test_logprob_memory_is_chunked():
    """The compiled loss never holds [batch, length, vocab] float32 logits: its temporaries stay far
    below the size of that array."""
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=32768)
    B, Tn, chunk = 8, 256, 128
    full_logits_bytes = B * Tn * cfg.vocab_size * 4  # 268 MB
    h = jax.ShapeDtypeStruct((B, Tn, cfg.hidden_size), jnp.float32)
    w = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.vocab_size), jnp.float32)
    t = jax.ShapeDtypeStruct((B, Tn), jnp.int32)

    def loss(h, w, t, chunk):
        lp, ent = logprobs.token_logprobs(h, w, t, 1.0, chunk, with_entropy=True)
        return lp.sum() + ent.sum()

    def temp_bytes(chunk):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
        return fn.lower(h, w, t, chunk).compile().memory_analysis().temp_size_in_bytes

    chunk_logits_bytes = chunk * cfg.vocab_size * 4  # 16.8 MB
    chunked, unchunked = temp_bytes(chunk), temp_bytes(B * Tn)
    assert unchunked >= full_logits_bytes  # sanity: one chunk of everything does materialise them
    # A few chunk-sized buffers (logits, softmax, their cotangents), independent of batch x length.
    assert chunked <= 5 * chunk_logits_bytes < full_logits_bytes / 3, (chunked, chunk_logits_bytes)


def _policy_batch(cfg, B=8, P=6, C=7, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "prompt_ids": jnp.asarray(rng.integers(1, cfg.vocab_size, (B, P))),
        "prompt_mask": jnp.asarray(np.arange(P)[None] >= rng.integers(0, 4, (B, 1))),
        "completion_ids": jnp.asarray(rng.integers(1, cfg.vocab_size, (B, C))),
        "completion_mask": jnp.asarray(np.arange(C)[None] < rng.integers(1, C + 1, (B, 1))),
        "advantages": jnp.asarray(rng.normal(size=B), jnp.float32),
        "old_logp": jnp.asarray(-rng.uniform(5.5, 6.8, (B, C)), jnp.float32),
        "ref_logp": jnp.asarray(-rng.uniform(5.5, 6.8, (B, C)), jnp.float32),
        "truncated": jnp.asarray(rng.random(B) < 0.3),
    }


@pytest.fixture(scope="module")
def tiny_params():
    return transformer.init_params(architecture.SHAPES["tiny"], jax.random.key(0))


@pytest.mark.parametrize("aggregation", sorted(loss.AGGREGATIONS))
def test_microbatch_invariance(aggregation, tiny_params):
    cfg, params = architecture.SHAPES["tiny"], tiny_params
    batch = _policy_batch(cfg)
    lcfg = loss.LossConfig(aggregation=aggregation, max_completion_length=7, mask_truncated=True)
    (l1, g1, m1), *rest = [objective.make_loss_and_grad(cfg, lcfg, None, n)(params, batch) for n in (1, 2, 4)]
    for ln, gn, mn in rest:
        np.testing.assert_allclose(float(ln), float(l1), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), gn, g1)
        for k in m1:
            np.testing.assert_allclose(float(mn[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    # The loss is the formula's value on the whole batch.
    lp, _ = jax.jit(logprobs.completion_logprobs, static_argnums=1)(
        params, cfg, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    s, d, _ = loss.grpo_loss_terms(lp, batch["advantages"], batch["completion_mask"], lcfg,
                                old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], truncated=batch["truncated"])
    np.testing.assert_allclose(float(l1), float(s / d), rtol=1e-6)


WORKER = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import sys; sys.path.insert(0, "tests")
    from test_objective import _policy_batch
    from grpo_jax.models import architecture
    from grpo_jax.models import placement
    from grpo_jax.models import transformer
    from grpo_jax.parallel import partitioning
    from grpo_jax.rl import loss
    from grpo_jax.rl import objective
    assert jax.device_count() == 8
    cfg = architecture.SHAPES["tiny"]
    params = transformer.init_params(cfg, jax.random.key(0))
    batch = _policy_batch(cfg, B=16)
    worst = 0.0
    # Every aggregation on the (2, 2, 2) mesh with and without micro-batches, and on one other mesh
    # each, so that every mesh shape is covered without compiling all 15 pairs.
    assert len(loss.AGGREGATIONS) == 3
    for agg, other in zip(sorted(loss.AGGREGATIONS), [(8, 1, 1), (2, 4, 1), (4, 2, 1)]):
        lcfg = loss.LossConfig(aggregation=agg, max_completion_length=7, mask_truncated=True)
        l0, g0, m0 = objective.make_loss_and_grad(cfg, lcfg, None)(params, batch)
        for shape in [other, (2, 2, 2)]:
            mesh = partitioning.make_mesh(*shape)
            p = placement.shard_params(params, cfg, mesh)
            b = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            for n in ((1, 2) if shape == (2, 2, 2) else (1,)):
                l, g, m = objective.make_loss_and_grad(cfg, lcfg, mesh, n)(p, b)
                err = max([abs(float(l) - float(l0))] + [float(jnp.abs(x - y).max()) for x, y in
                           zip(jax.tree.leaves(g), jax.tree.leaves(g0))])
                assert err < 1e-6, (agg, shape, n, err)
                assert abs(float(m["kl"]) - float(m0["kl"])) < 1e-6
                worst = max(worst, err)
    print("worst", worst)
    print("OK")
""")


def test_partitioned_loss_equals_single_device(simulated_devices):
    assert simulated_devices(WORKER, name="test_objective.WORKER").strip().endswith("OK")
