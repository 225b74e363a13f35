"""LoRA adapters: exact base logits at initialisation, the adapted model against its merged weights and
against peft + transformers, the reference as the base with adapters off (no copy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import VARIANTS, tiny_hf_model

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import lora
from grpo_jax.models import transformer
from grpo_jax.rollout import sampler

# Llama 3 with biases is the peft test's; together they cover every family hf loads but Mistral
# (Llama's projections).
FAMILIES = ["qwen2", "qwen3", "gemma3", "qwen3-moe-raw"]


def _load(name, tmp_path):
    arch, kw = VARIANTS[name] if name in VARIANTS else (name, {})
    hf_model = tiny_hf_model(arch, **kw)
    hf_model.save_pretrained(tmp_path)
    params, cfg = hf.load_hf(tmp_path)
    return hf_model, params, cfg


def _tokens(cfg, shape=(2, 9), seed=0):
    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, shape)
    mask = np.ones(shape, bool)
    mask[1, :3] = False  # a left-padded row
    return jnp.asarray(ids), jnp.asarray(mask)


def _trained(adapters, seed=1):
    """Adapters moved away from their start: B random (it starts at zero), A as it was."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x, adapters)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_leave_the_logits_exactly_the_base_ones(family, tmp_path):
    _, base, cfg = _load(family, tmp_path)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") if cfg.num_experts else architecture.LORA_TARGETS
    lcfg = cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    params = lora.add_adapters(base, lcfg, jax.random.key(0))
    _, adapters = lora.split(params)
    want = {f"{t}_lora" for t in targets}
    got = set(adapters["layers"]["attn"]) | set(adapters["layers"].get("mlp", {}))
    assert got == want
    a = adapters["layers"]["attn"]["q_proj_lora"]["a"]
    assert a.shape == (cfg.num_layers, cfg.hidden_size, 4) and float(jnp.abs(a).max()) > 0
    ids, mask = _tokens(cfg)
    np.testing.assert_array_equal(np.asarray(transformer.forward(params, lcfg, ids, mask)[0]),
                                  np.asarray(transformer.forward(base, cfg, ids, mask)[0]))


@pytest.mark.parametrize("family", ["llama3-rope-bias", "gemma3"])
def test_adapters_equal_their_merged_weights_and_peft(family, tmp_path):
    """With trained adapters: our forward = the base with W + A B alpha / r folded in = transformers'
    model with the PEFT folder save_peft wrote, loaded by peft = the merged HF export."""
    import peft

    hf_model, base, cfg = _load(family, tmp_path / "base")
    lcfg = cfg.replace(lora_rank=3, lora_alpha=12.0)
    fresh, adapters = lora.split(lora.add_adapters(base, lcfg, jax.random.key(2)))
    params = lora.join(fresh, _trained(adapters))
    ids, mask = _tokens(cfg, (2, 8))
    ours = np.asarray(transformer.forward(params, lcfg, ids, mask)[0])
    base_logits = np.asarray(transformer.forward(base, cfg, ids, mask)[0])
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters change the model
    merged = np.asarray(transformer.forward(lora.merged(params, lcfg), lora.base_config(lcfg), ids, mask)[0])
    np.testing.assert_allclose(ours, merged, atol=1e-4)

    folder = lora.save_peft(tmp_path / "adapter", params, lcfg, base_model=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf_model, folder)
    with torch.no_grad():
        want = peft_model(input_ids=torch.as_tensor(np.asarray(ids)),
                          attention_mask=torch.as_tensor(np.asarray(mask).astype(np.int64))).logits.numpy()
    m = np.asarray(mask)
    np.testing.assert_allclose(ours[m], want[m], atol=1e-4)
    # the merged export is a plain HF checkpoint with the same logits
    import transformers

    hf.save_hf(lora.merged(params, lcfg), lora.base_config(lcfg), tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        want = plain(input_ids=torch.as_tensor(np.asarray(ids)),
                     attention_mask=torch.as_tensor(np.asarray(mask).astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours[m], want[m], atol=1e-4)


def test_the_reference_is_the_base_with_adapters_off_not_a_copy(tmp_path):
    _, base, cfg = _load("qwen2", tmp_path)
    lcfg = cfg.replace(lora_rank=4)
    fresh, adapters = lora.split(lora.add_adapters(base, lcfg, jax.random.key(0)))
    params = lora.join(fresh, _trained(adapters))
    again, _ = lora.split(params)
    # the frozen base is held once: split and join hand the same arrays around
    assert all(x is y for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(base)))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    n_adapters = sum(x.size for x in jax.tree.leaves(lora.split(params)[1]))
    assert sum(x.size for x in jax.tree.leaves(params)) == n_base + n_adapters
    L, d, q, kv, f, r = cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, 4
    assert n_adapters == L * r * ((d + q) * 2 + (d + kv) * 2 + 3 * (d + f))
    ids, mask = _tokens(cfg)
    ref = transformer.forward(params, lora.base_config(lcfg), ids, mask)[0]
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(transformer.forward(base, cfg, ids, mask)[0]))


def test_gradients_reach_the_adapters_through_the_frozen_base(tmp_path):
    """d loss / d adapters by autodiff of the adapted forward equals the finite difference; at the
    start only B gets a gradient (A's is x^T (dy B^T) = 0 while B = 0), as in PEFT."""
    _, base, cfg = _load("qwen2", tmp_path)
    lcfg = cfg.replace(lora_rank=2, lora_alpha=4.0, lora_targets=("v_proj", "down_proj"))
    fresh, adapters = lora.split(lora.add_adapters(base, lcfg, jax.random.key(0)))
    ids, mask = _tokens(cfg)

    def loss(adapters):
        logits = transformer.forward(lora.join(fresh, adapters), lcfg, ids, mask)[0]
        return jnp.sum(jax.nn.log_softmax(logits)[..., 1] * mask) / mask.sum()

    g = jax.grad(loss)(adapters)
    assert float(jnp.abs(g["layers"]["attn"]["v_proj_lora"]["a"]).max()) == 0.0
    gb = g["layers"]["mlp"]["down_proj_lora"]["b"]
    assert float(jnp.abs(gb).max()) > 0
    eps, idx = 1e-3, (1, 0, 3)
    bump = lambda s: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: x.at[idx].add(s * eps) if "down_proj_lora" in str(p) and p[-1].key == "b" else x, adapters)
    numeric = (loss(bump(1)) - loss(bump(-1))) / (2 * eps)
    assert float(gb[idx]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-6)


def test_bad_lora_settings_name_the_values():
    cfg = architecture.SHAPES["tiny"]
    with pytest.raises(ValueError, match="lora_targets=.*'w_q'"):
        cfg.replace(lora_rank=4, lora_targets=("w_q",))
    with pytest.raises(ValueError, match="experts of a mixture-of-experts"):
        architecture.SHAPES["tiny-moe"].replace(lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank > 0"):
        lora.add_adapters(transformer.init_params(cfg, jax.random.key(0)), cfg, jax.random.key(0))


def test_sampling_with_unmerged_adapters_equals_the_merged_model():

    cfg = architecture.SHAPES["tiny"].replace(vocab_size=256, lora_rank=4)
    base = transformer.init_params(lora.base_config(cfg), jax.random.key(0))
    fresh, adapters = lora.split(lora.add_adapters(base, cfg, jax.random.key(1)))
    params = lora.join(fresh, _trained(adapters, seed=3))
    sc = sampler.SamplingConfig(max_new_tokens=8, temperature=0.8, prompt_buckets=(8,))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    got = sampler.sample(params, cfg, prompts, 3, sc, jax.random.key(0))
    want = sampler.sample(lora.merged(params, cfg), lora.base_config(cfg), prompts, 3, sc, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)
    plain = sampler.sample(base, lora.base_config(cfg), prompts, 3, sc, jax.random.key(0))
    assert not np.array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
