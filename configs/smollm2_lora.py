"""configs/smollm2.py with LoRA: rank-16 adapters on every projection of the frozen SmolLM2-135M-Instruct
(the KL reference too: no second copy), trained at 10x the full fine-tune's learning rate.

    python scripts/train.py --config=configs/smollm2_lora.py
    python scripts/export_hf.py --config=configs/smollm2_lora.py --out=exports/smollm2_lora  # merged
    python scripts/export_hf.py --config=configs/smollm2_lora.py --peft --out=exports/smollm2_peft
"""

from configs import smollm2


def get_config():
    c = smollm2.get_config()
    c.workdir = "runs/smollm2_lora"
    c.model.lora.rank, c.model.lora.alpha = 16, 32.0
    c.optimizer.learning_rate = 2e-5  # LoRA wants ~10x a full fine-tune's rate (Schulman et al. 2025)
    return c
