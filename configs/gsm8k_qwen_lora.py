"""configs/gsm8k_qwen.py with LoRA: rank-16 adapters on every projection of Qwen2.5-0.5B-Instruct,
the frozen base stored once in bfloat16 (it is the KL reference too), float32 adapters and AdamW
state for them only; checkpoints hold the adapters and the base's fingerprint.

    python scripts/train.py --config=configs/gsm8k_qwen_lora.py
    python scripts/export_hf.py --config=configs/gsm8k_qwen_lora.py --peft --out=exports/qwen_peft

For a 7B-8B model on one GPU, change model.source (e.g. Qwen/Qwen2.5-7B-Instruct) and keep remat:
the update's memory is in docs/benchmarks.md ("LoRA").
"""

from configs import base
from configs import gsm8k_qwen


def get_config():
    return base.lora(gsm8k_qwen.get_config(), learning_rate=1e-5)  # 10x configs/gsm8k_qwen.py's
