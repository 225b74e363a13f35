"""The model sharded over 8 simulated CPU devices gives the single-device logits.

XLA fixes the device count when JAX starts, so the sharded part runs in the session's 8-device worker (the `simulated_devices` fixture)."""

import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning

WORKER = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from grpo_jax.models import architecture
    from grpo_jax.models import lora
    from grpo_jax.models import placement
    from grpo_jax.models import transformer
    from grpo_jax.parallel import partitioning
    from grpo_jax.rollout import sampler
    assert jax.device_count() == 8, jax.devices()
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=256, intermediate_size=96)
    params = transformer.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 256, size=(8, 10)))
    mask = jnp.asarray(np.arange(10)[None] >= rng.integers(0, 6, size=(8, 1)))
    want = np.asarray(transformer.forward(params, cfg, ids, mask)[0])
    fwd = jax.jit(transformer.forward, static_argnums=1)
    for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]:
        mesh = partitioning.make_mesh(*shape)
        p = placement.shard_params(params, cfg, mesh)
        b = partitioning.batch_sharding(mesh)
        got, _ = fwd(p, cfg, jax.device_put(ids, b), jax.device_put(mask, b))
        err = float(np.abs(np.asarray(got) - want)[np.asarray(mask)].max())
        assert err < 1e-5, (shape, err)
        q = p["layers"]["attn"]["q_proj"]["kernel"]
        print(shape, "max err", err, "q_proj spec", q.sharding.spec, "shards", len(q.addressable_shards))
    # A LoRA checkpoint's base fingerprint reads exact values: the same on every mesh.
    prints = {lora.fingerprint(placement.shard_params(params, cfg, partitioning.make_mesh(*s))) for s in [(8, 1, 1), (1, 2, 4)]}
    assert prints == {lora.fingerprint(params)}, prints
    mesh = partitioning.make_mesh(1, 2, 4)
    spec = placement.param_shardings(cfg, mesh)["layers"]["attn"]["k_proj"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None), spec  # 2 kv heads: not split 4 ways
    # The sampler under a mesh: rows split over data x fsdp, KV heads over tensor; same tokens as on
    # one device (greedy), and the same log-probabilities.
    prompts = [list(rng.integers(1, 256, n)) for n in (3, 7, 5, 2)]
    sc = sampler.SamplingConfig(max_new_tokens=6, greedy=True, prompt_buckets=(8,))
    ref = sampler.sample(params, cfg, prompts, 2, sc, jax.random.key(0))
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = partitioning.make_mesh(*shape)
        r = sampler.sample(placement.shard_params(params, cfg, mesh), cfg, prompts, 2, sc, jax.random.key(0), mesh=mesh)
        assert np.array_equal(np.asarray(r.tokens), np.asarray(ref.tokens)), shape
        assert np.abs(np.asarray(r.logprobs) - np.asarray(ref.logprobs)).max() < 1e-5, shape
        assert len(r.tokens.sharding.device_set) == 8
    # 3 prompts x G=2 = 6 rows do not split over 8 devices: the sampler pads the rows (and drops the
    # padding) instead of replicating the rollout; the rows it returns are the single-device ones.
    ref3 = sampler.sample(params, cfg, prompts[:3], 2, sc, jax.random.key(1))
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = partitioning.make_mesh(*shape)
        r = sampler.sample(placement.shard_params(params, cfg, mesh), cfg, prompts[:3], 2, sc, jax.random.key(1), mesh=mesh)
        assert r.tokens.shape == (6, 6), r.tokens.shape
        assert np.array_equal(np.asarray(r.tokens), np.asarray(ref3.tokens)), shape
    # Finished rows leave the batch under a mesh too: sizes in multiples of the 4 row shards, the
    # cache rows moved across devices, the tokens those of one device's static batch.
    T, eos_at = 96, rng.integers(1, 65, 32)
    ids, mask = (jnp.asarray(a) for a in sampler.pad_prompts(prompts, (8,)))
    def run(p, mesh, factor):
        sc = sampler.SamplingConfig(max_new_tokens=T, eos_ids=(3,), prompt_buckets=(8,), shrink_factor=factor)
        logits, cache = sampler.prefill(p, ids, mask, cfg=cfg, num_generations=8, max_new_tokens=T, mesh=mesh)
        return sampler.decode(p, cache, logits, jax.random.key(2), cfg=cfg, sampling=sc, mesh=mesh, eos_at=eos_at)
    ref = run(params, None, 1.0)
    mesh = partitioning.make_mesh(2, 2, 2)
    got = run(placement.shard_params(params, cfg, mesh), mesh, 1.5)
    sizes = [n for n, _, _ in got.batches]
    assert len(set(sizes)) > 2 and all(n % 4 == 0 for n in sizes), got.batches
    assert np.array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    assert np.abs(np.asarray(got.logps) - np.asarray(ref.logps)).max() < 1e-5
    assert len(got.tokens.sharding.device_set) == 8
    print("OK")
""")


def test_sharded_forward_matches_single_device(simulated_devices):
    assert simulated_devices(WORKER, name="test_sharding.WORKER").strip().endswith("OK")


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"needs 4 devices, have 1"):
        partitioning.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        partitioning.make_mesh(-1, -1, 1)


def test_default_rules_cover_every_logical_axis():
    specs = jax.tree.leaves(transformer.param_logical_axes(architecture.SHAPES["tiny"]), is_leaf=lambda x: isinstance(x, P))
    used = {axis for spec in specs for axis in spec}
    assert used <= {name for name, _ in partitioning.RULES}
