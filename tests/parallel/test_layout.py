"""Properties of the compiled programs on simulated devices: how the work is laid out over the mesh.

Values are equal on every mesh (test_objective, test_sharding); these tests read the optimized HLO
(grpo_jax.parallel.compiled) and XLA's memory analysis, which is where a layout that would run out of memory
or move the model over the network per token shows up. XLA fixes the device count when JAX starts,
so the programs are compiled in the session's 8-device worker process (the `simulated_devices` fixture).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.parallel import compiled
from grpo_jax.rollout import sampler

COMMON = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from grpo_jax.models import architecture
    from grpo_jax.models import placement
    from grpo_jax.models import transformer
    from grpo_jax.parallel import compiled
    from grpo_jax.parallel import partitioning
    from grpo_jax.rl import loss
    from grpo_jax.rl import objective
    from grpo_jax.rollout import sampler
    assert jax.device_count() == 8
    B, PL, C, D, V = 32, 32, 32, 256, 1000
    # distinct sizes, so that shapes in the HLO say what they are: heads 8 x 32, rows 32, tokens 64
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=V, hidden_size=D, intermediate_size=768, num_heads=8,
                                       num_kv_heads=8, head_dim=32, num_layers=2, tie_word_embeddings=False)

    def abstract(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    def mesh_of(shape):
        return partitioning.make_mesh(*shape)
""")

LOSS_WORKER = COMMON + textwrap.dedent("""
    base = cfg
    for shape, cfg in [((1, 8, 1), base), ((2, 4, 1), base), ((1, 8, 1), base.replace(remat="full"))]:
        mesh = mesh_of(shape)
        params = abstract(transformer.param_shapes(cfg), placement.param_shardings(cfg, mesh))
        rows = lambda n, dt: jax.ShapeDtypeStruct((B, n) if n else (B,), dt, sharding=partitioning.batch_sharding(mesh, 2 if n else 1))
        batch = {"prompt_ids": rows(PL, jnp.int32), "prompt_mask": rows(PL, bool), "completion_ids": rows(C, jnp.int32),
                 "completion_mask": rows(C, bool), "advantages": rows(0, jnp.float32), "old_logp": rows(C, jnp.float32),
                 "ref_logp": rows(C, jnp.float32)}
        chunk = 128  # 16 tokens per device per step
        fn = objective.make_loss_and_grad(cfg, loss.LossConfig(logprob_chunk=chunk), mesh)
        text = fn.lower(params, batch).compile().as_text()
        ops, loops = compiled.collectives(text), compiled.while_loops(text)
        per_device = B // 8
        # 1. The layer scans (forward and backward) carry this device's rows of the residual stream.
        layer_loops = [w for w in loops if w.trip_count == cfg.num_layers]
        assert len(layer_loops) >= 2, loops
        for w in layer_loops:
            residual = [a.shape for a in w.carry if len(a.shape) == 3 and a.shape[1:] == (PL + C, D)]
            assert residual and all(s[0] == per_device for s in residual), (shape, residual)
            full = [a.shape for a in w.carry if len(a.shape) >= 3 and a.shape[-1] == D and a.shape[0] == B]
            assert not full, (shape, full)
        # 2. Every layer weight is all-gathered inside the layer scans and its gradient reduce-
        #    scattered there (one layer at a time, never the whole model at once).
        inside = [o for o in ops if o.in_loop and o.count == cfg.num_layers]
        gathered = {tuple(a.shape) for o in inside if o.op == "all-gather" for a in o.result}
        assert {(D, 8, 32), (8, 32, D), (D, 768), (768, D)} <= gathered, gathered
        scattered = sum(o.bytes for o in inside if o.op == "reduce-scatter")
        layer_weights = sum(int(np.prod(s.shape[1:])) * 4 for s in jax.tree.leaves(transformer.param_shapes(cfg)["layers"]))
        assert scattered >= layer_weights // 8 * 0.9, (shape, scattered, layer_weights)
        # XLA:CPU prints the layers' reduce-scatters as all-reduce + slice (counted above); the LM
        # head's, explicit in the log-probability shard_map, is a reduce-scatter op on every backend.
        assert [o for o in ops if o.op == "reduce-scatter" and not o.as_all_reduce and o.result[0].shape[-1] == V], ops
        # 3. No activation is all-reduced: with tensor = 1 nothing [rows, length, ...] is summed.
        acts = [a.shape for o in ops if o.op == "all-reduce" for a in o.result
                if len(a.shape) >= 2 and a.shape[0] in (B, per_device) and a.shape[1] in (PL + C, C)]
        assert not acts, (shape, acts)
        # 4. The log-probability scan: each device runs the head on chunk / 8 of its own tokens.
        head = {(D // f, V) for f in (1, 2, 4, 8)}  # the head and its fsdp shards
        logits = [a for ins in compiled.Program(text).instructions() for a in ins.result
                  if a.shape and a.shape[-1] == V and a.shape not in head]
        biggest = max(int(np.prod(a.shape)) for a in logits)
        assert biggest <= chunk * V // 8, (shape, biggest, chunk * V // 8)
        assert not [o for o in ops if o.in_loop and o.count == chunk and o.op != "reduce-scatter"]
        print(shape, cfg.remat, "residual", residual[0], "scattered", scattered, "logits", biggest)
    print("OK")
""")


def test_fsdp_splits_the_batch_gathers_weights_and_scatters_gradients(simulated_devices):
    """Loss and gradient on (1, 8, 1) and (2, 4, 1): the batch over data x fsdp, weights gathered per
    layer and their gradients reduce-scattered per layer, no activation all-reduce, head per device."""
    assert simulated_devices(LOSS_WORKER, name="LOSS_WORKER").strip().endswith("OK")


SAMPLER_WORKER = COMMON + textwrap.dedent("""
    cfg = cfg.replace(dtype="bfloat16")  # float32 master weights, bfloat16 compute
    sc = sampler.SamplingConfig(max_new_tokens=8)
    for shape in [(1, 8, 1), (2, 2, 2)]:
        mesh = mesh_of(shape)
        stored = abstract(transformer.param_shapes(cfg), placement.param_shardings(cfg, mesh))
        copy, run_cfg = jax.eval_shape(lambda p: sampler.inference_params(p, cfg, mesh)[0], stored), cfg.replace(param_dtype="bfloat16")
        assert all(s.dtype == jnp.bfloat16 for s in jax.tree.leaves(copy))
        copy = abstract(copy, placement.param_shardings(run_cfg, mesh, partitioning.INFERENCE_RULES))
        in_loop = {}
        for name, (p, c) in {"inference copy": (copy, run_cfg), "training": (stored, cfg)}.items():
            N = 16
            ids = jax.ShapeDtypeStruct((N // 2, PL), jnp.int32, sharding=partitioning.batch_sharding(mesh))
            logits, cache = jax.eval_shape(lambda p, i, m: sampler.prefill(p, i, m, cfg=c, num_generations=2, max_new_tokens=8, mesh=mesh), p, ids, ids.update(dtype=bool))
            specs = sampler._cache_specs(c, mesh, N)
            cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k])) for k, v in cache.items()}
            logits = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
            text = sampler.decode_program(p, cache, logits, cfg=c, sampling=sc, mesh=mesh).compile().as_text()
            ops = compiled.collectives(text)
            in_loop[name] = [o for o in ops if o.in_loop and o.op == "all-gather" and o.bytes >= 4096]
        assert not in_loop["inference copy"], (shape, [(o.op, o.result) for o in in_loop["inference copy"]])
        if shape[1] > 1:  # the training layout does gather per token: the test can tell them apart
            assert in_loop["training"], shape
        print(shape, "decode loop all-gathers:", {k: len(v) for k, v in in_loop.items()})
    print("OK")
""")


def test_decode_loop_reads_local_weights(simulated_devices):
    """Decoding reads bfloat16 weights split over tensor only (the inference copy decode makes once
    per rollout): no weight all-gather inside the decode while loop. Reading the stored layout as it
    is (gather_weights=False) gathers every layer per token."""
    assert simulated_devices(SAMPLER_WORKER, name="SAMPLER_WORKER").strip().endswith("OK")


SHRINK_WORKER = COMMON + textwrap.dedent("""
    N, S = 64, 48
    sc = sampler.SamplingConfig(max_new_tokens=16)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = mesh_of(shape)
        cache = jax.eval_shape(lambda: transformer.init_cache(cfg, N, S))
        first = jax.ShapeDtypeStruct((N, V), jnp.float32)
        state = jax.eval_shape(lambda c, l: sampler.decode_state(c, l, sc), cache, first)
        where = sampler._state_shardings(state, cfg, mesh)
        where.logits = NamedSharding(mesh, P(where.logits.spec[0]))
        state = abstract(state, where)
        out = {k: getattr(state, k) for k in sampler._RESULTS}
        for results in (None, out):  # the first shrink, and a later one that also stores the results
            c = sampler._shrink.lower(state, results, cfg=cfg, size=40, mesh=mesh).compile()
            ops = compiled.collectives(c.as_text())
            assert not ops, (shape, [(o.op, o.result) for o in ops])
            m = c.memory_analysis()
            assert m.temp_size_in_bytes < m.argument_size_in_bytes / 4, (shape, m)
        print(shape, "shrink: no collective")
    print("OK")
""")


def test_shrinking_the_decode_batch_moves_no_cache_between_devices(simulated_devices):
    """Finished rows leave the decode batch on the device that holds them: each row shard keeps its
    own live rows (`sampler._shrink`), so the compiled shrink has no collective at all (it used to
    all-reduce the whole kept KV cache, with 10x the arguments in temporaries) and no temporary of
    the cache's size, on a data mesh and on a data x fsdp x tensor one."""
    assert simulated_devices(SHRINK_WORKER, name="SHRINK_WORKER").strip().endswith("OK")


def test_prefill_memory_does_not_grow_with_prompt_length_times_vocab():
    """The prefill computes float32 logits for the last prompt position only: a larger vocabulary
    adds about [B, vocab] to its temporaries, not [B, prompt length, vocab]."""
    B, P = 8, 256

    def temp(vocab):
        cfg = architecture.SHAPES["tiny"].replace(vocab_size=vocab)
        ids = jax.ShapeDtypeStruct((B, P), jnp.int32)
        exe = sampler.prefill.lower(transformer.param_shapes(cfg), ids, ids.update(dtype=bool), cfg=cfg, num_generations=2,
                                    max_new_tokens=8).compile()
        return compiled.memory(exe)["temporaries"]

    grown = temp(32768) - temp(512)
    every_position = B * P * (32768 - 512) * 4  # what [B, P, vocab] float32 logits would add: 264 MB
    assert grown < every_position / 32, (grown, every_position)


def test_inference_copy_gives_the_same_logits():
    """A bfloat16 copy of float32 master weights computes exactly what the forward pass computes from
    the float32 weights (it casts every weight to the compute dtype at use)."""
    cfg = architecture.SHAPES["tiny"].replace(dtype="bfloat16")
    params = transformer.init_params(cfg, jax.random.key(0))
    copy, run_cfg = sampler.inference_params(params, cfg, None)
    assert run_cfg.param_dtype == "bfloat16" and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(copy))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 9)))
    a, _ = transformer.forward(params, cfg, ids)
    b, _ = transformer.forward(copy, run_cfg, ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


LOAD_WORKER = COMMON + textwrap.dedent("""
    import sys, tempfile
    from grpo_jax.models import hf
    mesh = mesh_of((1, 8, 1))
    small = cfg.replace(dtype="float32")
    expect = placement.param_shardings(small, mesh)
    params = placement.init_params(small, mesh, jax.random.key(0))
    folder = tempfile.mkdtemp()
    hf.save_hf(jax.device_get(params), small, folder)
    loaded, _ = hf.load_hf(folder, shardings=expect)
    for tree in (params, loaded):
        for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(expect)):
            local = sh.shard_shape(x.shape)
            assert x.sharding == sh and all(s.data.shape == local for s in x.addressable_shards), (x.shape, local)
            split = [d for d, e in zip(x.shape, local) if d != e]
            assert not split or int(np.prod(local)) * 8 == int(np.prod(x.shape)), (x.shape, local)
    emb = loaded["embedding"]
    assert emb.addressable_shards[0].data.shape == (V, D // 8)
    np.testing.assert_array_equal(np.asarray(jax.device_get(loaded["embedding"])), np.asarray(jax.device_get(params["embedding"])))
    # Each device's block is read on its own, layer by layer, as the rows and columns it covers: never
    # a whole tensor (reading one raises here), on an fsdp, a data x fsdp x tensor and an expert mesh.
    whole = hf._Tensors.__getitem__
    hf._Tensors.__getitem__ = lambda self, name: (_ for _ in ()).throw(AssertionError(f"read whole: {name}"))
    try:
        moe = architecture.SHAPES["tiny-moe"].replace(dtype="float32")
        for model, shape in ((small, (1, 8, 1)), (small, (2, 2, 2)), (moe, (1, 4, 2)), (moe, (1, 2, 1, 4))):
            mesh = partitioning.make_mesh(*shape[:3], expert=shape[3] if len(shape) > 3 else 1)
            want = placement.init_params(model, mesh, jax.random.key(1))
            folder = tempfile.mkdtemp()
            hf.save_hf(jax.device_get(want), model, folder)
            got, _ = hf.load_hf(folder, shardings=placement.param_shardings(model, mesh))
            for (where, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
                assert a.sharding == b.sharding, (shape, where)
                np.testing.assert_array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)), err_msg=str(where))
    finally:
        hf._Tensors.__getitem__ = whole
    print("OK")
""")


def test_sharded_init_and_load_hold_only_each_devices_shard(simulated_devices):
    """Random init (jit with out_shardings) and HF loading place each weight straight onto the mesh:
    every device holds its shard only (addressable shard shapes), never the whole model."""
    assert simulated_devices(LOAD_WORKER, name="LOAD_WORKER").strip().endswith("OK")


def test_compiled_reader_counts_collectives_through_loops():
    """grpo_jax.parallel.compiled multiplies each collective by the trip counts of the loops around it and
    reads the three printed forms of replica groups."""
    text = textwrap.dedent("""
        HloModule m

        %body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
          %p = (s32[], f32[8,4]) parameter(0)
          %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
          %ag = f32[32,4]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
          ROOT %t = (s32[], f32[8,4]) tuple(%i, %x)
        }

        %cond (p: (s32[], f32[8,4])) -> pred[] {
          ROOT %c = pred[] constant(true)
        }

        ENTRY %main (a: f32[8,4]) -> f32[8,4] {
          %a = f32[8,4]{1,0} parameter(0)
          %ar = bf16[16]{0} all-reduce(%a), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
          %w = (s32[], f32[8,4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
          ROOT %r = f32[8,4]{1,0} all-gather(%a), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}
        }
    """)
    ops = {(o.op, o.count, o.group_size, o.in_loop, o.bytes) for o in compiled.collectives(text)}
    assert ops == {("all-gather", 5, 4, True, 32 * 4 * 4), ("all-reduce", 1, 2, False, 32),
                   ("all-gather", 1, 4, False, 128)}, ops
    assert compiled.collective_bytes(compiled.collectives(text)) == {
        "all-gather": 5 * 512 * 3 // 4 + 128 * 3 // 4, "all-reduce": 2 * 32 // 2}
    (loop,) = compiled.while_loops(text)
    assert loop.trip_count == 5 and loop.carry[1].shape == (8, 4)
