"""DAPO (Yu et al. 2025, arXiv:2503.14476) on top of the GSM8K/Qwen run: clip-higher
(eps_low 0.2, eps_high 0.28), dynamic sampling (groups whose accuracy, the `math` reward, is the same
for every completion are replaced by new prompts' groups, as many prompts as are missing, up to 3
rounds a step), token-level loss, no KL, overlong reward shaping, truncated completions masked.

    python scripts/train.py --config=configs/dapo.py
"""

from configs import gsm8k_qwen


def get_config():
    c = gsm8k_qwen.get_config()
    c.workdir = "runs/dapo"
    c.grpo.clip_eps_low, c.grpo.clip_eps_high = 0.2, 0.28
    c.grpo.aggregation = "token-mean"
    c.grpo.dynamic_sampling, c.grpo.max_sampling_rounds = True, 3
    c.grpo.beta = 0.0
    c.grpo.mask_truncated = True
    c.grpo.overlong_buffer = 128  # the last 128 of the 512 tokens are penalised linearly
    c.rewards = {"math": 1.0, "format_lenient": 0.2, "overlong": 1.0}
    return c
