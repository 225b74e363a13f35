"""Model families beyond plain Llama and Qwen2, each against a tiny random transformers model: Qwen3
(q/k norms, head_dim apart from hidden/heads), Qwen3-MoE (top-k experts; more in test_moe), Mistral's sliding window on every layer, Qwen2's on
some layers, Gemma 3 ((1 + w) and post norms, scaled embeddings, GeLU-tanh, local/global layers with
their own RoPE bases). KV-cache decoding against the full forward, greedy decoding against `generate`. Logit
parity on both attention paths and save_hf round trips are in test_model / test_hf (conftest.VARIANTS)."""

import tempfile

import jax
import numpy as np
import pytest
from conftest import left_padded_batch, tiny_hf_model
from test_model import _decode_against_full
from test_sampler import hf_generate, random_prompts

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import pretrained
from grpo_jax.models import tokenizer
from grpo_jax.rollout import policy
from grpo_jax.rollout import sampler
from grpo_jax.run import config
from grpo_jax.run import trainer

FAMILIES = {  # windows shorter than the 14 to 18 tokens the tests decode, so that they cut
    "qwen3": ("qwen3", dict(hidden_size=72, intermediate_size=100, head_dim=24, num_attention_heads=6,
                            num_key_value_heads=2)),
    "mistral-window": ("mistral", dict(sliding_window=5)),
    # 7 experts, 3 per token: routing differs per token (test_moe checks that it is not trivial)
    "qwen3-moe": ("qwen3_moe", dict(hidden_size=40, moe_intermediate_size=22, head_dim=12, num_experts=7,
                                    num_experts_per_tok=3, norm_topk_prob=True)),
    "qwen2-mixed-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma3": ("gemma3", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    arch, kw = FAMILIES[request.param]
    hf_model = tiny_hf_model(arch, **kw)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        params, cfg = hf.load_hf(d)
    return request.param, hf_model, params, cfg


def test_config_is_read(family):
    name, hf_model, params, cfg = family
    assert cfg.architecture == {"gemma3": "gemma3_text"}.get(FAMILIES[name][0], FAMILIES[name][0])
    hc = hf_model.config
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    assert cfg.qk_norm == (cfg.architecture in ("qwen3", "qwen3_moe", "gemma3_text")) and cfg.head_dim == head_dim
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (getattr(hc, "num_experts", 0), getattr(hc, "num_experts_per_tok", 0))
    assert cfg.gemma_norms == cfg.embed_scale == (cfg.architecture == "gemma3_text")
    assert cfg.sliding_layers == {"qwen3": (False,) * 3, "qwen3-moe": (False,) * 3, "mistral-window": (True,) * 3,
                                  "qwen2-mixed-window": (False, True, True), "gemma3": (True, False, True)}[name]
    assert cfg.num_params == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("chunks", [[8], [3, 8]], ids=["prefill", "chunked-prefill"])
def test_cached_decoding_matches_full_forward(family, chunks):
    _, _, params, cfg = family
    prompts, pmask = left_padded_batch(cfg.vocab_size, [8, 5, 2])
    cont = np.random.default_rng(3).integers(1, cfg.vocab_size, size=(3, 6))
    ids = np.concatenate([prompts, cont], 1)
    mask = np.concatenate([pmask, np.ones_like(cont, bool)], 1)
    _decode_against_full(params, cfg, ids, mask, chunks)


def test_greedy_matches_transformers_generate(family):
    _, hf_model, params, cfg = family
    prompts = random_prompts([7, 3, 12, 1])
    sc = sampler.SamplingConfig(max_new_tokens=10, greedy=True, prompt_buckets=(16,))
    got = np.asarray(sampler.sample(params, cfg, prompts, 1, sc, jax.random.key(0)).tokens)
    np.testing.assert_array_equal(got, hf_generate(hf_model, prompts, 16, 10))


def test_qwen3_shapes_match_their_parameter_counts():
    # Qwen3 model cards: 0.6B (0.44B without embeddings), 8B (8.2B)
    assert 0.59e9 < architecture.SHAPES["qwen3-0.6b"].num_params < 0.61e9
    assert 8.1e9 < architecture.SHAPES["qwen3-8b"].num_params < 8.3e9


def test_llama3_style_tokenizer_without_pad_stops_on_generation_config_ids(tmp_path):
    """A Llama-3-style checkpoint: the tokenizer has no pad (and here no EOS) token, config.json no
    eos_token_id; the stop ids come only from generation_config.json. The trainer pads with the
    first stop id and stops completions there."""
    import json

    from test_trainer import tiny_config

    folder = tmp_path / "llama3ish"
    tok = tokenizer.CharTokenizer().to_hf()
    tok.pad_token, tok.eos_token = None, None
    hf_model = tiny_hf_model("llama", vocab_size=128, eos_token_id=None, bos_token_id=1, pad_token_id=None)
    hf_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    stops = [2, tok.convert_tokens_to_ids("\n")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "bos_token_id": 1}))
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json.get("eos_token_id") is None and cfg_json.get("pad_token_id") is None

    c = tiny_config(tmp_path / "run", steps=2)
    c.model.source = c.model.tokenizer = str(folder)
    tr = trainer.Trainer(c)
    try:
        assert tr.policy.tokenizer.pad_token_id is None and tr.policy.tokenizer.eos_token_id is None
        assert tr.policy.sampling.eos_ids == tuple(stops) and tr.policy.sampling.pad_id == stops[0]
        out = tr.run()
        assert [h["step"] for h in out["history"]][-1] == 2
        rollout = tr.current_policy().rollout(tr.task.eval[:4], 4, jax.random.key(1))
        tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
        for row, n in zip(tokens, lengths):  # a stopped row ends in a stop id and is padded after it
            if n < tokens.shape[1]:
                assert row[n - 1] in stops and (row[n:] == stops[0]).all()
    finally:
        tr.close()
    with pytest.raises(ValueError, match="pad_id=None must be a token id"):
        sampler.SamplingConfig(max_new_tokens=4, pad_id=None)
    with pytest.raises(ValueError, match="neither a pad nor an EOS token and sampling.eos_ids is empty"):
        config.sampling_config(c, tok, ())


# The generation-prompt part of Qwen3's chat template (the thinking switch), over ChatML turns.
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_chat_template_thinking_switch(enable_thinking):

    tok = pretrained.qwen2_tokenizer()
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    fmt = policy.PromptFormat("chat", "question", "", enable_thinking)
    ids = fmt.ids({"question": "What is 2 + 3?"}, tok)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    want = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)


def test_new_shapes_match_their_parameter_counts():
    assert 0.99e9 < architecture.SHAPES["gemma-3-1b"].num_params < 1.01e9  # Gemma 3 1B: 999.9M
    assert 7.2e9 < architecture.SHAPES["mistral-7b"].num_params < 7.3e9  # Mistral 7B: 7.24B
    assert architecture.SHAPES["gemma-3-1b"].sliding_layers.count(False) == 4  # 1 global layer in 6
