"""configs/smollm2.py with LoRA: rank-16 adapters on every projection of the frozen SmolLM2-135M-Instruct
(the KL reference too: no second copy), trained at 10x the full fine-tune's learning rate.

    python scripts/train.py --config=configs/smollm2_lora.py
    python scripts/export_hf.py --config=configs/smollm2_lora.py --out=exports/smollm2_lora  # merged
    python scripts/export_hf.py --config=configs/smollm2_lora.py --peft --out=exports/smollm2_peft
"""

from configs import base
from configs import smollm2


def get_config():
    return base.lora(smollm2.get_config(), learning_rate=2e-5)  # 10x configs/smollm2.py's
