"""Qwen3-MoE: the router and experts against transformers, the two expert implementations against each
other, the load-balancing loss against transformers' and inside the GRPO loss, and expert parallelism
on simulated devices (values equal to one device; no expert weight crosses the expert axis)."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import left_padded_batch, tiny_hf_model

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import moe
from grpo_jax.models import transformer
from grpo_jax.rl import loss
from grpo_jax.rl import objective

MOE = dict(hidden_size=40, moe_intermediate_size=22, head_dim=12, num_experts=7, num_experts_per_tok=3,
           norm_topk_prob=True)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    hf_model = tiny_hf_model("qwen3_moe", **MOE)
    folder = tmp_path_factory.mktemp("moe")
    hf_model.save_pretrained(folder)
    params, cfg = hf.load_hf(folder)
    return hf_model, params, cfg


def _hf_outputs(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
                        output_router_logits=True)


def test_routing_is_not_trivial(qwen3_moe):
    """The test model routes tokens to different expert sets, using every expert: a bug in top-k,
    the gates or the expert order cannot hide behind uniform routing."""
    hf_model, _, cfg = qwen3_moe
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5])
    logits = _hf_outputs(hf_model, ids, mask).router_logits[0]  # [tokens, E]
    chosen = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
    assert len({tuple(r) for r in chosen.tolist()}) >= 8
    assert set(chosen.flatten().tolist()) == set(range(cfg.num_experts))


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_ragged_logits_match_transformers(qwen3_moe, attention):
    """(The default on CPU, dense, is held to transformers for every family in test_model.)"""
    impl = "ragged"
    hf_model, params, cfg = qwen3_moe
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5])
    ours, _ = transformer.forward(params, cfg.replace(moe_impl=impl, attention=attention), jnp.asarray(ids), jnp.asarray(mask))
    ref = _hf_outputs(hf_model, ids, mask).logits.float().numpy()
    np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=2e-5, rtol=1e-5)


def test_ragged_and_dense_experts_agree_with_gradients(qwen3_moe):
    _, params, cfg = qwen3_moe
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5], seed=1)
    w = jax.random.normal(jax.random.key(0), (*ids.shape, cfg.vocab_size))

    def f(p, impl):
        logits, _, balance = transformer.forward(p, cfg.replace(moe_impl=impl), jnp.asarray(ids), jnp.asarray(mask),
                                           router_loss=True)
        return jnp.sum(jnp.where(jnp.asarray(mask)[..., None], logits * w, 0.0)) + balance

    (va, ga), (vb, gb) = (jax.value_and_grad(f)(params, impl) for impl in ("ragged", "dense"))
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
    moe_grads = ga["layers"]["moe"]
    assert all(float(jnp.abs(moe_grads[k]).min(axis=(-2, -1)).max()) > 0 for k in ("gate_proj", "down_proj"))
    assert float(jnp.abs(moe_grads["router"]).max()) > 0


def test_balance_loss_matches_transformers(qwen3_moe):
    """Our per-layer (assignments, probabilities) sums give transformers' load_balancing_loss_func
    over the real tokens of a padded batch; uniform routing gives k, its minimum."""
    hf_model, params, cfg = qwen3_moe
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5], seed=2)
    _, _, ours = transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask), router_loss=True)
    ref = float(_hf_outputs(hf_model, ids, mask).aux_loss)
    np.testing.assert_allclose(float(ours), ref, rtol=1e-5)
    assert ref > cfg.num_experts_per_tok
    uniform = jnp.stack([jnp.full((7,), 3.0 * 10 * cfg.num_layers / 7), jnp.full((7,), 10.0 * cfg.num_layers / 7)])
    np.testing.assert_allclose(float(moe.router_balance_loss(uniform, jnp.asarray(10), cfg)), 3.0, rtol=1e-6)


def _batch(cfg, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    pids, pmask = left_padded_batch(cfg.vocab_size, rng.integers(2, 7, rows).tolist(), seed=seed)
    cids = rng.integers(1, cfg.vocab_size, (rows, 5))
    cmask = np.arange(5)[None] < rng.integers(1, 6, rows)[:, None]
    return {"prompt_ids": jnp.asarray(pids), "prompt_mask": jnp.asarray(pmask), "completion_ids": jnp.asarray(cids),
            "completion_mask": jnp.asarray(cmask), "advantages": jnp.asarray(rng.normal(size=rows), jnp.float32)}


def test_grpo_loss_adds_the_balance_loss_with_its_coefficient(qwen3_moe):
    """loss(coef) = loss(0) + coef x the mean over micro-batches of each micro-batch's balance loss
    (computed here straight from transformer.forward on its prompt + completion tokens)."""
    _, params, cfg = qwen3_moe
    batch = _batch(cfg)
    base = loss.LossConfig(beta=0.0)
    l0, g0, m0 = objective.loss_and_grad(params, batch, cfg, base, num_microbatches=2)
    l1, g1, m1 = objective.loss_and_grad(params, batch, cfg, dataclasses.replace(base, router_aux_loss_coef=0.01),
                                         num_microbatches=2)
    micro = objective.split_microbatches(batch, 2)
    balances = []
    for mb in (jax.tree.map(lambda x: x[k], micro) for k in range(2)):
        tokens = jnp.concatenate([mb["prompt_ids"], mb["completion_ids"]], 1)
        mask = jnp.concatenate([mb["prompt_mask"], mb["completion_mask"]], 1)
        balances.append(float(transformer.forward(params, cfg, tokens, mask, router_loss=True)[2]))
    np.testing.assert_allclose(float(l1) - float(l0), 0.01 * np.mean(balances), rtol=1e-4)
    np.testing.assert_allclose(float(m1["router_balance_loss"]), np.mean(balances), rtol=1e-5)
    assert float(m0["router_balance_loss"]) == pytest.approx(float(m1["router_balance_loss"]))
    # it moves the routers' gradients, and not those of the last layer's experts (which no router reads)
    assert float(jnp.abs(g1["layers"]["moe"]["router"] - g0["layers"]["moe"]["router"]).max()) > 0
    np.testing.assert_allclose(g1["layers"]["moe"]["gate_proj"][-1], g0["layers"]["moe"]["gate_proj"][-1], atol=1e-9)


def test_mixed_dense_and_sparse_layers_are_refused():
    cfg = tiny_hf_model("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16).config.to_dict()
    with pytest.raises(hf.CheckpointError, match="mlp_only_layers"):
        hf.config_from_hf({**cfg, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        architecture.SHAPES["tiny"].replace(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8)


def test_qwen3_30b_a3b_shape():
    cfg = architecture.SHAPES["qwen3-30b-a3b"]
    assert 30.4e9 < cfg.num_params < 30.6e9  # model card: 30.5B in total, 3.3B activated


EXPERT_PARALLEL = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from grpo_jax.models import architecture
    from grpo_jax.models import placement
    from grpo_jax.models import transformer
    from grpo_jax.parallel import compiled
    from grpo_jax.parallel import partitioning
    from grpo_jax.rl import loss
    from grpo_jax.rl import objective
    from grpo_jax.rollout import sampler
    assert jax.device_count() == 8
    E, D, F = 8, 64, 48
    cfg = architecture.SHAPES["tiny"].replace(architecture="qwen3_moe", qk_norm=True, num_experts=E, num_experts_per_tok=2,
                                       moe_intermediate_size=F, norm_topk_prob=True, hidden_size=D)
    params = transformer.init_params(cfg, jax.random.key(0))
    params["layers"]["moe"]["router"] = params["layers"]["moe"]["router"] * 50  # decisive routing
    rng = np.random.default_rng(0)
    B = 16  # != E, so that a gathered [rows, length, D] is not mistaken for a gathered expert
    batch = {"prompt_ids": jnp.asarray(rng.integers(1, 512, (B, 6))), "prompt_mask": jnp.asarray(np.arange(6)[None] >= rng.integers(0, 4, B)[:, None]),
             "completion_ids": jnp.asarray(rng.integers(1, 512, (B, 5))), "completion_mask": jnp.asarray(np.arange(5)[None] < rng.integers(1, 6, B)[:, None]),
             "advantages": jnp.asarray(rng.normal(size=B), jnp.float32)}
    lcfg = loss.LossConfig(beta=0.0, router_aux_loss_coef=0.01)
    meshes = [dict(data=1, fsdp=2, tensor=2, expert=2), dict(data=1, fsdp=1, tensor=1, expert=8)]
    for impl, shapes in (("ragged", meshes),):  # dense: the same shard_map around another local mix
        c = cfg.replace(moe_impl=impl)
        want_loss, want_grads, _ = objective.make_loss_and_grad(c, lcfg)(params, batch)
        for shape in shapes:
            mesh = partitioning.make_mesh(shape["data"], shape["fsdp"], shape["tensor"], expert=shape["expert"])
            p = placement.shard_params(params, c, mesh)
            b = partitioning.shard_batch(batch, mesh)
            fn = objective.make_loss_and_grad(c, lcfg, mesh)
            got_loss, got_grads, _ = fn(p, b)
            np.testing.assert_allclose(got_loss, want_loss, rtol=2e-5, atol=1e-6)
            for a, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
                np.testing.assert_allclose(a, w, atol=2e-5 * float(jnp.abs(w).max()) + 1e-7)
            # Each device stores E / expert of the experts (over fsdp and tensor as well) ...
            w = p["layers"]["moe"]["gate_proj"]
            assert w.addressable_shards[0].data.shape == (cfg.num_layers, E // shape["expert"], D // shape["fsdp"], F // shape["tensor"])
            # ... and no collective moves a whole expert dimension: gathers over fsdp give [E / expert, D, F / tensor].
            text = fn.lower(p, b).compile().as_text()
            whole = {s for f in (F, F // 2) for d in (D, D // 2) for s in ((E, d, f), (E, f, d))}
            for op in compiled.collectives(text):
                for a in op.result:
                    assert tuple(a.shape[-3:]) not in whole, (shape, op.text[:200])
                    # nor the router's [rows, T, E] probabilities (top-k runs on each device's rows)
                    assert not (op.op == "all-gather" and len(a.shape) == 3 and a.shape[-1] == E), (shape, op.text[:200])
            if shape["fsdp"] > 1:  # ZeRO-3 over fsdp: each layer gathers this device's experts, whole in D
                mine = (E // shape["expert"], D, F // shape["tensor"])
                assert any(o.op == "all-gather" and o.in_loop and tuple(o.result[0].shape[-3:]) == mine
                           for o in compiled.collectives(text)), shape
    # Sampling on the expert-parallel mesh: the inference copy keeps the experts split, greedy tokens as on one device.
    sc = sampler.SamplingConfig(max_new_tokens=6, greedy=True, prompt_buckets=(8,))
    prompts = [list(map(int, rng.integers(1, 512, n))) for n in (3, 7, 5, 2)]
    want = np.asarray(sampler.sample(params, cfg, prompts, 2, sc, jax.random.key(0)).tokens)
    mesh = partitioning.make_mesh(1, 1, 2, expert=4)
    got = np.asarray(sampler.sample(placement.shard_params(params, cfg, mesh), cfg, prompts, 2, sc, jax.random.key(0), mesh=mesh).tokens)
    np.testing.assert_array_equal(got, want)
    # The decode loop moves tokens, never weights: its only gathers are the expert group's rows.
    copy, run_cfg = sampler.inference_params(placement.shard_params(params, cfg, mesh), cfg, mesh)
    ids = jnp.ones((8, 8), jnp.int32)
    logits, cache = sampler.prefill(copy, ids, ids.astype(bool), cfg=run_cfg, num_generations=2, max_new_tokens=6, mesh=mesh)
    text = sampler.decode_program(copy, cache, logits, cfg=run_cfg, sampling=sc, mesh=mesh).compile().as_text()
    gathers = [a.shape for o in compiled.collectives(text) if o.in_loop and o.op == "all-gather" for a in o.result]
    assert gathers and all(s[0] in (16, 4) and s[-1] in (1, 2, D) for s in gathers), gathers  # 16 rows, 4 per device
    print("ok")
""")


def test_expert_parallel_matches_one_device_and_keeps_experts_in_place(simulated_devices):
    assert "ok" in simulated_devices(EXPERT_PARALLEL, name="EXPERT_PARALLEL")


def test_config_round_trips_through_config_json(qwen3_moe):
    _, _, cfg = qwen3_moe
    assert cfg.norm_topk_prob and (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (7, 3, 22)
    back = hf.config_from_hf(hf.config_to_hf(cfg))
    assert back == cfg.replace(bos_token_id=back.bos_token_id)
