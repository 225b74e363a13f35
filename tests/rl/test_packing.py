"""Packed batches (grpo_jax.rl.packing): where the planner puts things, what each token sees, and a
loss, gradient and metrics equal to the padded batch's for every setting of the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models import architecture
from grpo_jax.models import attention
from grpo_jax.models import lora
from grpo_jax.models import moe
from grpo_jax.models import transformer
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss
from grpo_jax.rl import objective
from grpo_jax.rl import packing


def padded_batch(cfg, groups=3, G=4, P=6, C=7, seed=0, **lengths):
    """A padded batch of `groups` prompts (left-padded, real lengths 2..P) with G completions each."""
    rng = np.random.default_rng(seed)
    N = groups * G
    prompt_lengths = lengths.get("prompts", rng.integers(2, P + 1, groups))
    completion_lengths = lengths.get("completions", rng.integers(1, C + 1, N))
    pmask = np.repeat(np.arange(P)[None] >= (P - np.asarray(prompt_lengths))[:, None], G, 0)
    return {
        "prompt_ids": np.repeat(rng.integers(1, cfg.vocab_size, (groups, P)), G, 0) * pmask,
        "prompt_mask": pmask,
        "completion_ids": rng.integers(1, cfg.vocab_size, (N, C)),
        "completion_mask": np.arange(C)[None] < np.asarray(completion_lengths)[:, None],
        "advantages": rng.normal(size=N).astype(np.float32),
        "old_logp": -rng.uniform(5.5, 6.8, (N, C)).astype(np.float32),
        "ref_logp": -rng.uniform(5.5, 6.8, (N, C)).astype(np.float32),
        "sampler_logp": -rng.uniform(5.5, 6.8, (N, C)).astype(np.float32),
        "truncated": rng.random(N) < 0.3,
    }


def assert_same(a, b, rtol=1e-5, atol=1e-7, skip=()):
    """loss_and_grad outputs (loss, grads, metrics) equal within float32 rounding."""
    np.testing.assert_allclose(float(b[0]), float(a[0]), rtol=rtol, atol=atol)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a[1]), jax.tree.leaves(b[1])):
        scale = float(jnp.abs(x).max())
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=atol + rtol * scale,
                                   err_msg=jax.tree_util.keystr(path))
    assert set(a[2]) - set(skip) == set(b[2]) - set(skip)
    for k in set(a[2]) - set(skip):
        np.testing.assert_allclose(float(b[2][k]), float(a[2][k]), rtol=rtol, atol=atol, err_msg=k)


def both(cfg, params, batch, lcfg, G=4, frozen=None, num_microbatches=1, select=None, **plan_kwargs):
    """loss_and_grad of a padded batch and of its packed form (`select`: keep these batch keys)."""
    if select is not None:
        batch = {k: v for k, v in batch.items() if k in select}
    packed, plan = packing.from_padded(batch, G, row_multiple=num_microbatches, **plan_kwargs)
    f = jax.jit(lambda p, b: objective.loss_and_grad(p, b, cfg, lcfg, None, num_microbatches, frozen=frozen))
    return f(params, jax.tree.map(jnp.asarray, batch)), f(params, jax.tree.map(jnp.asarray, packed)), plan


@pytest.fixture(scope="module")
def tiny():
    cfg = architecture.SHAPES["tiny"]
    return cfg, transformer.init_params(cfg, jax.random.key(0))


# -- the planner ---------------------------------------------------------------------------------------

def _check_plan(pl, P, L, G, row_multiple=1):
    """Every completion once, in a piece of its own group whose prompt precedes it; no overlaps."""
    assert pl.rows % row_multiple == 0
    used = np.zeros((pl.rows, pl.row_tokens), int)
    for row, offset, g in zip(pl.piece_row, pl.piece_offset, pl.piece_group):
        used[row, offset:offset + P[g]] += 1
    for c in range(len(L)):
        k = pl.completion_piece[c]
        assert pl.piece_group[k] == c // G and pl.piece_row[k] == pl.completion_row[c]
        assert pl.completion_start[c] >= pl.piece_offset[k] + P[c // G]
        used[pl.completion_row[c], pl.completion_start[c]:pl.completion_start[c] + L[c]] += 1
    assert used.max() <= 1 and used.sum() == pl.unique_tokens + P[pl.piece_group].sum() - P.sum()
    assert sorted(zip(pl.completion_row, pl.completion_slot)) == sorted(set(zip(pl.completion_row, pl.completion_slot)))


def test_recipe_and_long_tail_shapes_compute_at_most_1_15_tokens_per_unique_token():
    rng = np.random.default_rng(0)
    # The SmolLM2 recipe: 8 prompts of ~56 tokens, G = 8, short completions (mean ~5.5).
    P, G = rng.integers(48, 64, 8), 8
    L = np.minimum(rng.geometric(1 / 5.5, 8 * G), 16)
    pl = packing.plan(P, L, G)
    _check_plan(pl, P, L, G)
    assert pl.computed_tokens / pl.unique_tokens <= 1.15
    padded = len(L) * (64 + 16)
    assert padded / pl.unique_tokens > 5  # what the padded batch computes
    # R1-style long tails: 256-token prompts, G = 16, lognormal lengths (mean ~300) capped at 4,096.
    P, G = np.full(16, 256), 16
    L = np.minimum(np.exp(rng.normal(np.log(300) - 0.5, 1.0, 16 * G)).astype(int) + 1, 4096)
    pl = packing.plan(P, L, G, row_multiple=8, shards=8)
    _check_plan(pl, P, L, G, 8)
    assert pl.computed_tokens / pl.unique_tokens <= 1.15, pl.computed_tokens / pl.unique_tokens
    assert len(L) * (256 + 4096) / pl.unique_tokens > 10


def test_a_group_larger_than_a_row_is_split_with_its_prompt_in_each_piece():
    P, G = np.array([30, 5]), 4
    L = np.array([20, 25, 18, 22, 3, 3, 3, 3])
    pl = packing.plan(P, L, G, max_row_tokens=64)
    _check_plan(pl, P, L, G)
    assert pl.row_tokens == 64 and (pl.piece_group == 0).sum() >= 2  # group 0 (115 tokens) in pieces
    # One prompt and its longest completion longer than max_row_tokens: the row grows to hold them.
    pl = packing.plan([40], [100, 1], 2, max_row_tokens=64)
    assert pl.row_tokens >= 140


def test_rows_are_balanced_over_shards_and_come_in_multiples():
    rng = np.random.default_rng(1)
    P, G = rng.integers(10, 200, 24), 4
    L = rng.integers(1, 300, 24 * G)
    pl = packing.plan(P, L, G, row_multiple=8, shards=4, max_row_tokens=1024)
    _check_plan(pl, P, L, G, 8)
    per_shard = pl.row_real_tokens.reshape(4, -1).sum(1)
    assert per_shard.max() - per_shard.min() <= pl.row_real_tokens.max(), per_shard


def test_a_priced_attention_prefers_shorter_rows():
    rng = np.random.default_rng(2)
    P, G = rng.integers(10, 30, 16), 8
    L = rng.integers(1, 12, 16 * G)
    flat, priced = packing.plan(P, L, G), packing.plan(P, L, G, attention_cost=0.01)
    _check_plan(priced, P, L, G)
    assert priced.row_tokens < flat.row_tokens and priced.rows > flat.rows
    cost = lambda pl: pl.rows * pl.row_tokens * (1 + 0.01 * pl.row_tokens)  # noqa: E731
    assert cost(priced) <= cost(flat)


def test_attention_cost_against_a_count_over_the_parameter_tree():
    from grpo_jax.rl import grpo

    for cfg in (architecture.SHAPES["tiny"], architecture.SHAPES["smollm2-135m"].replace(num_layers=2)):
        shapes = transformer.param_shapes(cfg)
        matmuls = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(shapes["layers"])
                      if "kernel" in jax.tree_util.keystr(path))
        weights = matmuls + cfg.hidden_size * cfg.vocab_size  # the layers' projections and the head
        want = grpo.ATTENTION_OVERHEAD * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim / weights
        np.testing.assert_allclose(grpo.attention_cost(cfg), want, rtol=1e-6)


def test_every_host_can_force_the_same_shapes_and_too_few_rows_are_named():
    P, L = [5, 7], [3, 4, 2, 9]
    pl = packing.plan(P, L, 2)
    forced = packing.plan(P, L, 2, rows=pl.rows * 2, row_tokens=pl.row_tokens * 2, slots=pl.slots * 2)
    assert (forced.rows, forced.row_tokens, forced.slots) == (pl.rows * 2, pl.row_tokens * 2, pl.slots * 2)
    with pytest.raises(ValueError, match="do not fit 1 rows of 16 tokens"):
        packing.plan(P, L, 2, rows=1, row_tokens=16)
    with pytest.raises(ValueError, match="prompt lengths must be >= 1"):
        packing.plan([0, 3], L, 2)


def test_hostile_padded_batches_are_refused(tiny):
    cfg, _ = tiny
    batch = padded_batch(cfg)
    with pytest.raises(ValueError, match="must share its prompt"):
        packing.from_padded({**batch, "prompt_ids": batch["prompt_ids"] + np.arange(12)[:, None]}, 4)
    holes = batch["completion_mask"].copy()
    holes[0, 0] = False
    holes[0, 1] = True
    with pytest.raises(ValueError, match="prefix of each row"):
        packing.from_padded({**batch, "completion_mask": holes}, 4)
    with pytest.raises(ValueError, match="groups of num_generations=5"):
        packing.from_padded(batch, 5)


# -- what each token sees ------------------------------------------------------------------------------

def test_each_token_sees_its_prompt_and_its_own_earlier_tokens_only(tiny):
    cfg, _ = tiny
    batch = padded_batch(cfg, groups=3, G=3)
    packed, pl = packing.from_padded(batch, 3, max_row_tokens=32)
    mask = np.asarray(attention.prefix_sharing_mask(jnp.asarray(packed["pieces"]), jnp.asarray(packed["members"])))
    # An independent account: the (row, index) of every token of every completion and prompt copy.
    for c in range(len(pl.completion_row)):
        r, start, n, k = pl.completion_row[c], pl.completion_start[c], pl.completion_lengths[c], pl.completion_piece[c]
        prompt = set(range(pl.piece_offset[k], pl.piece_offset[k] + pl.prompt_lengths[c // 3]))
        for j in range(n):
            q = start + j
            assert set(np.flatnonzero(mask[r, q])) == prompt | set(range(start, q + 1)), (c, j)
            assert packed["positions"][r, q] == pl.prompt_lengths[c // 3] + j
            want = batch["completion_ids"][c, j]
            assert packed["tokens"][r, q] == want
            src = packed["sources"][r, q]  # the token before it in its own sequence
            assert src == (max(prompt) if j == 0 else q - 1)
    empty = packed["pieces"] == 0
    assert all(set(np.flatnonzero(mask[r, t])) == {t} for r, t in zip(*np.nonzero(empty)))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_packed_logprobs_equal_padded_on_windowed_layers(impl):
    # Gemma-3-like local/global layers with a window shorter than the sequences, so that it cuts.
    cfg = architecture.SHAPES["tiny"].replace(sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                                              rope_local_theta=1e4, num_layers=2, attention=impl)
    params = transformer.init_params(cfg, jax.random.key(1))
    batch = padded_batch(cfg, groups=3, G=4, P=6, C=9)
    packed, pl = packing.from_padded(batch, 4, max_row_tokens=48)
    assert pl.rows > 1 and len(pl.piece_row) > pl.rows  # several pieces in a row
    einsum = cfg.replace(attention="einsum")
    want = logprobs.batch_logprobs(params, einsum, jax.tree.map(jnp.asarray, batch), with_entropy=True)
    got = logprobs.batch_logprobs(params, cfg, jax.tree.map(jnp.asarray, packed), with_entropy=True)
    valid = batch["completion_mask"]
    for a, b in zip(want, got):  # logp, entropy
        b = np.asarray(b)[pl.completion_row, pl.completion_slot]  # slots -> completions in batch order
        np.testing.assert_allclose(b[valid], np.asarray(a)[valid], rtol=1e-5, atol=1e-5)


def test_cudnn_is_refused_on_packed_rows_naming_the_setting(tiny):
    cfg, params = tiny
    packed, _ = packing.from_padded(padded_batch(cfg), 4)
    with pytest.raises(ValueError, match=r"model.attention='cudnn' cannot take the prefix-sharing mask"):
        logprobs.batch_logprobs(params, cfg.replace(attention="cudnn", dtype="bfloat16"),
                                jax.tree.map(jnp.asarray, packed))


# -- the loss: equal to the padded batch's -------------------------------------------------------------

# Each aggregation with its share of the other settings (every one of them is exact on its own: the
# loss reads the same [completions, tokens] values), so that the test compiles three losses, not 13.
SETTINGS = {
    "seq-mean-token-mean": dict(beta=0.04, kl_estimator="k3", rollout_correction="token_truncate"),
    "token-mean": dict(importance_level="sequence", kl_estimator="k1", dual_clip=3.0),
    "seq-mean-token-sum-norm": dict(beta=0.1, kl_estimator="k2", clip_eps_high=0.28),
}


@pytest.mark.parametrize("aggregation", sorted(loss.AGGREGATIONS))
def test_loss_gradient_and_metrics_equal_the_padded_batch(tiny, aggregation):
    """With π_old given (several updates per rollout), π_ref (beta > 0), the sampler's log-probabilities
    (the mismatch metrics, rollout correction) and truncated completions masked out."""
    cfg, params = tiny
    lcfg = loss.LossConfig(aggregation=aggregation, max_completion_length=7, mask_truncated=True,
                           **SETTINGS[aggregation])
    a, b, pl = both(cfg, params, padded_batch(cfg), lcfg, max_row_tokens=32)
    assert pl.rows > 1 and pl.slots * pl.rows > 12  # several rows, empty slots: both must count for nothing
    assert_same(a, b)


def test_micro_batches_are_exact_on_packed_rows(tiny):
    cfg, params = tiny
    lcfg = loss.LossConfig()
    batch = padded_batch(cfg, groups=4, seed=3)
    whole, _, _ = both(cfg, params, batch, lcfg, max_row_tokens=32)
    _, micro, pl = both(cfg, params, batch, lcfg, num_microbatches=2, max_row_tokens=32)
    assert pl.rows % 2 == 0
    assert_same(whole, micro)


def test_lora_gradients_are_exact_on_packed_rows(tiny):
    cfg, params = tiny
    lcfg_model = cfg.replace(lora_rank=4)
    full = lora.add_adapters(params, lcfg_model, jax.random.key(2))
    # adapters' B starts at zero (no gradient to A): move it so that both get gradients
    full = jax.tree.map(lambda x: x + 0.01 if x.ndim and x.shape[-1] != 4 else x, full)
    frozen, adapters = lora.split(full)
    a, b, _ = both(lcfg_model, adapters, padded_batch(cfg, seed=4), loss.LossConfig(), frozen=frozen, max_row_tokens=32)
    assert_same(a, b)


def test_a_mixture_of_experts_counts_the_prompt_once_in_its_balance_loss():
    cfg = architecture.SHAPES["tiny"].replace(architecture="qwen3_moe", qk_norm=True, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32)
    params = transformer.init_params(cfg, jax.random.key(0))
    params["layers"]["moe"]["router"] = params["layers"]["moe"]["router"] * 20  # decisive routing
    batch = padded_batch(cfg, seed=5)
    a, b, _ = both(cfg, params, batch, loss.LossConfig(), max_row_tokens=32)
    assert_same(a, b, skip=("router_balance_loss", "router_balance_loss/prompt_once"))
    assert "router_balance_loss" in a[2] and "router_balance_loss/prompt_once" in b[2]
    # The packed balance loss is the padded pass's with each group's prompt tokens counted on its
    # first row only (all rows still attend to them): routing statistics are sums over tokens.
    packed, _ = packing.from_padded(batch, 4, max_row_tokens=32)
    _, _, balance = logprobs.batch_logprobs(params, cfg, jax.tree.map(jnp.asarray, packed), router_loss=True)
    ids = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1).astype(bool)
    once = mask.copy()
    once[np.arange(len(ids)) % 4 != 0, :batch["prompt_ids"].shape[1]] = False
    causal = np.tril(np.ones((ids.shape[1],) * 2, bool))[None] & mask[:, None, :]
    _, _, stats = transformer.Transformer(cfg).apply({"params": params}, jnp.asarray(ids),
                                                     transformer.positions_from_mask(jnp.asarray(mask)),
                                                     jnp.asarray(causal), None, 0, True, None, jnp.asarray(once))
    want = moe.router_balance_loss(stats, jnp.asarray(once.sum()), cfg)
    np.testing.assert_allclose(float(balance), float(want), rtol=1e-5)
    assert abs(float(a[2]["router_balance_loss"]) - float(want)) > 1e-4  # the padded pass counts prompts G times


MESH_PROGRAM = """
import jax, jax.numpy as jnp, numpy as np
from test_packing import padded_batch, assert_same
from grpo_jax.models import architecture, placement, transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rl import loss, objective, packing
assert jax.device_count() == 8
cfg = architecture.SHAPES["tiny"]
params = transformer.init_params(cfg, jax.random.key(0))
batch = padded_batch(cfg, groups=6, G=4, seed=7)
lcfg = loss.LossConfig(aggregation="seq-mean-token-sum-norm", max_completion_length=7, mask_truncated=True)
want = objective.make_loss_and_grad(cfg, lcfg, None)(params, jax.tree.map(jnp.asarray, batch))
# (1, 8, 1) fsdp, (2, 4, 1) data x fsdp, (2, 2, 2) with tensor parallelism, with micro-batches there.
for shape, n in [((1, 8, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 2)]:
    mesh = partitioning.make_mesh(*shape)
    shards = partitioning.batch_shards(mesh)
    packed, pl = packing.from_padded(batch, 4, row_multiple=shards * n, shards=shards, max_row_tokens=32)
    b = partitioning.shard_batch(packed, mesh)
    got = objective.make_loss_and_grad(cfg, lcfg, mesh, n)(placement.shard_params(params, cfg, mesh), b)
    assert_same(want, got)
    print(shape, n, pl.rows, pl.row_tokens)
print("OK")
"""


def test_packed_loss_on_meshes_equals_the_padded_loss_on_one_device(simulated_devices):
    assert simulated_devices(MESH_PROGRAM, name="test_packing.MESH_PROGRAM").strip().endswith("OK")


@pytest.mark.parametrize("setting", ["plain", "iterations_and_microbatches"])
def test_a_grpo_step_on_packed_rows_equals_the_padded_step(tmp_path, setting):
    """The trainer's own step: same completions, then the same loss, KL, gradient norm and metrics,
    for fewer positions computed (update/tokens_per_unique)."""
    from test_trainer import tiny_config

    from grpo_jax.run import trainer

    history = {}
    for packed in (False, True):
        cfg = tiny_config(tmp_path / str(packed), steps=1)
        cfg.grpo.packing, cfg.eval.every, cfg.checkpoint.every = packed, 0, 0
        if setting != "plain":  # π_old from the old-policy pass, two accumulated micro-batches
            cfg.grpo.num_iterations, cfg.grpo.microbatches = 2, 2
        tr = trainer.Trainer(cfg)
        history[packed] = tr.run()["history"][-1]
        tr.close()
    a, b = history[False], history[True]
    assert a["reward"] == b["reward"] and a["completion_length/mean"] == b["completion_length/mean"]
    for k in ("loss", "kl", "entropy", "grad_norm", "clip_frac", "ratio_mean", "advantage_mean", "completion_length"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert b["update/tokens_per_unique"] < a["update/tokens_per_unique"]
    assert 1 <= b["update/tokens_per_unique"] <= 1.5 and b["update/rows"] >= 1


def test_packing_with_cudnn_attention_is_refused_before_any_work():
    from configs import base

    from grpo_jax.run import config

    cfg = base.get_config()
    cfg.model.attention, cfg.model.dtype = "cudnn", "bfloat16"
    with pytest.raises(config.ConfigError, match="grpo.packing=True with model.attention='cudnn'"):
        config.check(cfg)
    cfg.grpo.packing = False
    config.check(cfg)
