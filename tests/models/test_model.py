"""The Flax decoder against transformers' PyTorch Llama/Qwen2, and the KV cache against full forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import left_padded_batch, tiny_hf_model

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import layers
from grpo_jax.models import transformer


def torch_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_logit_parity_left_padded(hf_checkpoint, attention):
    hf_model, folder = hf_checkpoint
    params, cfg = hf.load_hf(folder, attention=attention)
    ids, mask = left_padded_batch(cfg.vocab_size, [17, 9, 3, 13])
    ref = torch_logits(hf_model, ids, mask)
    ours, _ = jax.jit(transformer.forward, static_argnums=1)(params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    ours = np.asarray(ours)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    # Padding must not leak into real tokens: row 2 alone gives the same logits as inside the batch.
    alone, _ = transformer.forward(params, cfg, jnp.asarray(ids[2:3, -3:]))
    np.testing.assert_allclose(np.asarray(alone)[0], ours[2, -3:], atol=1e-5)


def test_positions_matter_and_match(hf_checkpoint):
    """Guard against parity that holds because rope does nothing: RoPE is relative, so a gap in the
    positions must change the logits, and ours must follow transformers' explicit position_ids."""
    hf_model, folder = hf_checkpoint
    params, cfg = hf.load_hf(folder)
    ids = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(2, 12))
    pos = np.arange(12)[None].repeat(2, 0) + np.where(np.arange(12) >= 6, 5, 0)
    with torch.no_grad():
        plain = hf_model(input_ids=torch.as_tensor(ids)).logits.numpy()
        gapped = hf_model(input_ids=torch.as_tensor(ids), position_ids=torch.as_tensor(pos)).logits.numpy()
    assert np.abs(gapped[:, 6:] - plain[:, 6:]).max() > 1e-2
    ours, _ = transformer.forward(params, cfg, jnp.asarray(ids), positions=jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(ours), gapped, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "default"},
])
def test_rope_inv_freq_matches_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=512,
                                      rope_parameters={"rope_theta": 500000.0, **rope})
    cfg = hf.config_from_hf(hf_cfg.to_dict())
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    np.testing.assert_allclose(layers.rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)


def _decode_against_full(params, cfg, ids, mask, prefill_chunks):
    """Prefill the left-padded prompts (in chunks) then decode the rest token by token; every step's
    logits must equal those of one full forward pass over the whole sequence."""
    full, _ = transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    full = np.asarray(full)
    B, T = ids.shape
    cache = transformer.init_cache(cfg, B, T + 3)  # room to spare: unused slots must stay invisible
    step = jax.jit(transformer.forward, static_argnums=1, donate_argnames="cache")
    out, start = [], 0
    for end in prefill_chunks + list(range(prefill_chunks[-1] + 1, T + 1)):
        logits, cache = step(params, cfg, jnp.asarray(ids[:, start:end]), jnp.asarray(mask[:, start:end]), cache)
        out.append(np.asarray(logits))
        start = end
    out = np.concatenate(out, axis=1)
    np.testing.assert_allclose(out[mask], full[mask], atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == T
    np.testing.assert_array_equal(np.asarray(cache["pos"]), mask.sum(1))


@pytest.mark.parametrize("chunks", [[8], [3, 8]], ids=["prefill", "chunked-prefill"])
def test_cached_decoding_matches_full_forward(chunks):
    hf_model = tiny_hf_model("llama")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        params, cfg = hf.load_hf(d)
    prompts, pmask = left_padded_batch(cfg.vocab_size, [8, 5, 2])
    cont = np.random.default_rng(3).integers(1, cfg.vocab_size, size=(3, 6))
    ids = np.concatenate([prompts, cont], 1)
    mask = np.concatenate([pmask, np.ones_like(cont, bool)], 1)
    _decode_against_full(params, cfg, ids, mask, chunks)


def test_remat_and_bf16():
    cfg = architecture.SHAPES["tiny"]
    params = transformer.init_params(cfg, jax.random.key(0))
    ids, mask = left_padded_batch(cfg.vocab_size, [7, 4])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(p, c):
        logits, _ = transformer.forward(p, c, ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * mask)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = grad(params, cfg)
    for remat in ("full", "dots"):
        l1, g1 = grad(params, cfg.replace(remat=remat))
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)

    bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits16, _ = transformer.forward(p16, bf, ids, mask)
    logits32, _ = transformer.forward(params, cfg, ids, mask)
    assert logits16.dtype == jnp.float32  # the head accumulates in float32
    assert np.abs(np.asarray(logits16 - logits32))[np.asarray(mask)].max() < 0.05
    cache = transformer.init_cache(bf, 2, 16)
    assert cache["k"].dtype == jnp.bfloat16


def test_float32_residual_stream_with_bf16_compute():
    """residual_dtype="float32": the layer scan carries the residual stream in float32 (what the
    remat checkpoints hold), in the full forward and in the cached decode alike."""
    cfg = architecture.SHAPES["tiny"].replace(dtype="bfloat16")
    params = transformer.init_params(cfg, jax.random.key(1))
    ids, mask = (jnp.asarray(a) for a in left_padded_batch(cfg.vocab_size, [16, 11, 13, 9]))
    for residual in (None, "float32"):
        c = cfg.replace(residual_dtype=residual)
        for fn in (lambda p: transformer.forward(p, c, ids, mask)[0],
                   lambda p: transformer.forward(p, c, ids, mask, transformer.init_cache(c, 4, 20))[0]):
            jaxpr = jax.make_jaxpr(fn)(params)
            carries = [v.aval.dtype for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"
                       for v in e.outvars if v.aval.shape == (4, 16, cfg.hidden_size)]
            assert carries == [jnp.dtype(residual or "bfloat16")], carries
    with pytest.raises(ValueError, match="residual_dtype='fp32'"):
        cfg.replace(residual_dtype="fp32")


def test_packed_attention_matches_masked_einsum():
    """attention="xla" packs each row's real tokens to the front and runs causal attention with key
    lengths (the form cuDNN's fused kernel takes); on left-padded prompts + right-padded completions,
    and on a mask with holes, it must give the real tokens the masked einsum's values and gradients."""
    from grpo_jax.rl.logprobs import completion_logprobs

    cfg = architecture.SHAPES["tiny"]
    params = transformer.init_params(cfg, jax.random.key(1))
    prompts, pmask = left_padded_batch(cfg.vocab_size, [9, 4, 1, 6])
    rng = np.random.default_rng(5)
    comp = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(4, 7)))
    cmask = jnp.asarray(np.arange(7)[None] < np.array([7, 3, 5, 1])[:, None])
    prompts, pmask = jnp.asarray(prompts), jnp.asarray(pmask)

    def loss(p, c):
        logp, ent = completion_logprobs(p, c, prompts, pmask, comp, cmask, 0.7, 5, with_entropy=True)
        return jnp.sum(jnp.where(cmask, logp + 0.1 * ent, 0.0)), (logp, ent)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l0, (lp0, e0)), g0 = grad(params, cfg)
    (l1, (lp1, e1)), g1 = grad(params, cfg.replace(attention="xla"))
    m = np.asarray(cmask)
    np.testing.assert_allclose(np.asarray(lp1)[m], np.asarray(lp0)[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(e1)[m], np.asarray(e0)[m], atol=2e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), g1, g0)

    holes = jnp.asarray(rng.random((3, 12)) < 0.6).at[:, -1].set(True)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(3, 12)))
    forward = jax.jit(transformer.forward, static_argnums=1)
    ref, _ = forward(params, cfg, ids, holes)
    out, _ = forward(params, cfg.replace(attention="xla"), ids, holes)
    np.testing.assert_allclose(np.asarray(out)[np.asarray(holes)], np.asarray(ref)[np.asarray(holes)], atol=2e-5)


def test_param_count_and_logical_axes():
    for name, cfg in architecture.SHAPES.items():
        if name != "tiny":
            continue
        shapes = transformer.param_shapes(cfg)
        assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == cfg.num_params
        axes = transformer.param_logical_axes(cfg)
        assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
            jax.tree.structure(shapes)
        assert tuple(axes["layers"]["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    # Published sizes (transformers' count for these configs).
    assert architecture.SHAPES["qwen2.5-0.5b"].num_params == 494_032_768
    assert architecture.SHAPES["qwen2.5-1.5b"].num_params == 1_543_714_304
    assert architecture.SHAPES["smollm2-135m"].num_params == 134_515_008


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        architecture.SHAPES["tiny"].replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat='some'"):
        architecture.SHAPES["tiny"].replace(remat="some")
    with pytest.raises(ValueError, match="attention='flash'"):
        architecture.SHAPES["tiny"].replace(attention="flash")
    with pytest.raises(ValueError, match="attention='cudnn' needs dtype bfloat16 or float16, got dtype='float32'"):
        architecture.SHAPES["tiny"].replace(attention="cudnn")
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        architecture.SHAPES["tiny"].replace(rope_scaling=(("factor", 4.0), ("rope_type", "yarn")))


def test_forward_refuses_to_write_past_the_cache_or_the_positions():
    cfg = architecture.SHAPES["tiny"].replace(max_position_embeddings=6)
    params = transformer.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="6 tokens do not fit a KV cache of 4 slots"):
        transformer.forward(params, cfg, jnp.ones((1, 6), jnp.int32), None, transformer.init_cache(cfg, 1, 4))
    _, cache = transformer.forward(params, cfg, jnp.ones((1, 3), jnp.int32), None, transformer.init_cache(cfg, 1, 4))
    with pytest.raises(ValueError, match="writing 2 tokens at slot 3 runs past the KV cache's 4 slots"):
        transformer.forward(params, cfg, jnp.ones((1, 2), jnp.int32), None, cache)
    _, cache = transformer.forward(params, cfg, jnp.ones((1, 6), jnp.int32), None, transformer.init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match="rotary position 6 is past the model's max_position_embeddings=6"):
        transformer.forward(params, cfg, jnp.ones((1, 1), jnp.int32), None, cache)
    # without a cache too (issue 39): a teacher-forced sequence longer than the model's range, under
    # jit as well (checked at trace time), and explicit positions past it
    transformer.forward(params, cfg, jnp.ones((1, 6), jnp.int32))
    with pytest.raises(ValueError, match="rotary position 6 is past the model's max_position_embeddings=6"):
        transformer.forward(params, cfg, jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="rotary position 6 is past"):
        jax.jit(lambda p, t: transformer.forward(p, cfg, t)[0])(params, jnp.ones((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="rotary position 9 is past"):
        transformer.forward(params, cfg, jnp.ones((1, 2), jnp.int32), positions=jnp.asarray([[0, 9]]))
