"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) on top of the
GSM8K/Qwen run: advantages r - mean without the std division, and a sum over tokens divided by a
constant (max_new_tokens) instead of each completion's own length, which removes both biases.

    python scripts/train.py --config=configs/dr_grpo.py
"""

from configs import gsm8k_qwen


def get_config():
    c = gsm8k_qwen.get_config()
    c.workdir = "runs/dr_grpo"
    c.grpo.advantage_estimator = "dr_grpo"
    c.grpo.aggregation = "seq-mean-token-sum-norm"
    c.grpo.beta = 0.0
    return c
