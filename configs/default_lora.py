"""The default run with a LoRA GRPO stage: the same cold start (a full fine-tune of the random-weight
model: adapters cannot teach a random model the format), then GRPO trains rank-16 adapters on
every projection of the cold-start policy, which stays frozen (and would be the KL reference).

    python scripts/train.py --config=configs/default_lora.py
"""

from ml_collections import ConfigDict

from configs import default


def get_config():
    c = default.get_config()
    c.workdir = "runs/default_lora"
    c.model.lora.rank, c.model.lora.alpha = 16, 32.0
    c.cold_start.model = ConfigDict({"lora": {"rank": 0}})  # the cold start stays a full fine-tune
    c.optimizer.learning_rate = 3e-3  # 10x the full fine-tune's
    return c
